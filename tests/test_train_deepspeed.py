"""`zerojax train --deepspeed ds_config.json --model HF_DIR`: a pure DeepSpeed JSON with HF's
"auto" values, filled from the Trainer's arguments."""
from __future__ import annotations

import json
import os

import pytest

from zerojax import cli
from zerojax.config import ConfigError
from zerojax.hf_auto import TrainerArguments, data_kind, resolve

AUTO_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


def test_autos_filled_as_the_hf_trainer_fills_them():
    args = TrainerArguments(per_device_train_batch_size=2, gradient_accumulation_steps=3,
                            learning_rate=1e-3, warmup_ratio=0.1, bf16=True)
    out, lines = resolve(AUTO_CONFIG, args, world_size=4, steps=50, hidden_size=32)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"],
            out["train_batch_size"]) == (2, 3, 24)
    assert out["gradient_clipping"] == 1.0
    assert out["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert out["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                          "warmup_num_steps": 5, "total_num_steps": 50}
    assert out["bf16"] == {"enabled": True}
    zero = out["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (1024, 921, 320)
    assert len(lines) == 16 and "auto: train_batch_size = 24 (data-parallel size 4" in lines[2]
    assert AUTO_CONFIG["train_batch_size"] == "auto"            # the input is not modified


def test_set_values_stay_unless_an_explicit_argument_contradicts_them():
    config = {"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    out, lines = resolve(config, TrainerArguments(), world_size=8, steps=10, hidden_size=32)
    assert out == config and lines == []                         # the defaults contradict nothing
    with pytest.raises(ConfigError, match=r"optimizer\.params\.lr is 0\.0001 in the JSON but "
                                          r"--learning_rate gives 0\.002"):
        resolve(config, TrainerArguments(learning_rate=2e-3, explicit=frozenset({"learning_rate"})),
                world_size=8, steps=10, hidden_size=32)


@pytest.mark.parametrize("config, steps, message", [
    ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, 10,
     r'zero_optimization\.sub_group_size: "auto" has no value to come from'),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}}, None,
     r'scheduler\.params\.total_num_steps: "auto" needs --steps'),
])
def test_autos_with_nothing_to_fill_them_are_errors(config, steps, message):
    with pytest.raises(ConfigError, match=message):
        resolve(config, TrainerArguments(), world_size=1, steps=steps, hidden_size=32)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    path = str(tmp_path_factory.mktemp("hf_llama"))
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(path)
    return path


def _ds_json(tmp_path, config=AUTO_CONFIG) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_train_deepspeed_on_the_corpus(hf_llama, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--deepspeed", _ds_json(tmp_path), "--model", hf_llama, "--steps", "2",
                   "--out", str(out), "--per_device_train_batch_size", "1", "--seq-len", "16",
                   "--learning-rate", "1e-3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "auto: train_batch_size = 8 (data-parallel size 8" in printed
    assert "auto: scheduler.params.total_num_steps = 2 (--steps)" in printed
    assert printed.count("auto: optimizer.params.lr = 0.001") == 1
    assert os.path.exists(out / "metrics.jsonl") and (out / "latest").exists()


def test_train_deepspeed_on_source_target_pairs(hf_llama, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": f"copy {w}:", "target": f" {w}"}) + "\n"
                            for w in ("alpha", "beta", "gamma", "delta") * 4))
    assert data_kind(str(data)) == "pairs" and data_kind(None) == "corpus"
    plain = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
             "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "zero_optimization": {"stage": 1}}
    rc = cli.main(["train", "--deepspeed", _ds_json(tmp_path, plain), "--model", hf_llama, "--data", str(data),
                   "--steps", "2", "--out", str(tmp_path / "sft"), "--per_device_train_batch_size", "1",
                   "--seq-len", "32"])
    assert rc == 0 and (tmp_path / "sft" / "latest").exists()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2"], "--deepspeed needs --model HF_DIR"),
    (["--model", "{model}", "--steps", "2", "--deepspeed", "{bad}"],
     'zero_optimization.sub_group_size: "auto" has no value to come from'),
    (["--model", "{tmp}", "--steps", "2"], "not a Hugging Face model directory"),
])
def test_train_deepspeed_bad_input_exits_2(hf_llama, tmp_path, capsys, argv, message):
    bad = _ds_json(tmp_path, {"zero_optimization": {"stage": 1, "sub_group_size": "auto"}})
    argv = [a.format(model=hf_llama, bad=bad, tmp=tmp_path) for a in argv]
    if "--deepspeed" not in argv:
        argv = ["--deepspeed", _ds_json(tmp_path)] + argv
    assert cli.main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_train_deepspeed_fine_tunes_t5_on_source_target(tmp_path):
    """An encoder-decoder model trains on the pairs themselves (loss on the targets)."""
    from transformers import T5Config, T5ForConditionalGeneration
    model_dir = str(tmp_path / "t5")
    T5ForConditionalGeneration(T5Config(
        vocab_size=256, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
        pad_token_id=0)).save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": w, "target": w[::-1]}) + "\n"
                            for w in ("alpha", "beta", "gamma", "delta") * 4))
    plain = {"train_micro_batch_size_per_gpu": "auto", "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
             "zero_optimization": {"stage": 3}}
    out = tmp_path / "run"
    rc = cli.main(["train", "--deepspeed", _ds_json(tmp_path, plain), "--model", model_dir, "--data", str(data),
                   "--steps", "2", "--out", str(out), "--per_device_train_batch_size", "1",
                   "--seq-len", "8", "--learning_rate", "1e-3"])
    assert rc == 0 and (out / "latest").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
