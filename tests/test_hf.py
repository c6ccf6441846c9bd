"""Hugging Face interop: tiny random `transformers` Llama / GPT-2 <-> zerojax, same logits both ways."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file

from zerojax import hf, partition
from zerojax.errors import CheckpointError
from zerojax.mesh import AXES
from zerojax.models import build
from zerojax.safetensors_io import BF16, Reader

torch.set_num_threads(2)
TOL = 1e-4
IDS = np.random.default_rng(0).integers(0, 128, size=(2, 16)).astype(np.int32)


def _perturbed(model):
    """Random values everywhere (HF initialises norms to 1 and biases to 0, which hides mix-ups)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_llama(tied=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    return _perturbed(transformers.LlamaForCausalLM(cfg))


def _hf_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return _perturbed(transformers.GPT2LMHeadModel(cfg))


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


@jax.jit
def _zj_logits(model, ids):
    return model.logits(ids)


def _hf_load(path, cls):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.float().eval()


def _zero3_shardings(path):
    """ZeRO-3 storage layout on (data 4, tensor 2): TP splits and ZeRO splits together."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 1, 4, 1, 2), AXES)
    section = hf.model_section(path)
    abstract = nnx.eval_shape(lambda: build(section, nnx.Rngs(0)))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    logical = partition.logical_axes(params)
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(params))
    layout = partition.make_layout(shapes, logical, mesh, stage=3)
    return layout.shardings(layout.params)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = _hf_llama()
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path)
    return model, path, _hf_logits(model)


def test_llama_logits_both_ways_and_zero3_sharded_load(llama, tmp_path, monkeypatch):
    hf_model, path, want = llama
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    model, params = hf.load_pretrained(path)
    assert not model.cfg.tie_word_embeddings and "lm_head" in params
    assert np.abs(np.asarray(_zj_logits(model, IDS)) - want).max() <= TOL

    # Directly sharded: each device reads only its slice, so every element is read once.
    shardings = _zero3_shardings(path)
    elements_read = []
    plain_read = Reader.read
    monkeypatch.setattr(Reader, "read", lambda self, name, index=None: elements_read.append(
        (out := plain_read(self, name, index)).size) or out)
    model3, params3 = hf.load_pretrained(path, shardings=shardings)
    monkeypatch.undo()
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params3))
    assert sum(elements_read) == total
    for array, sharding in zip(jax.tree.leaves(params3), jax.tree.leaves(shardings)):
        assert array.sharding == sharding
    assert shardings["layers"]["q_proj"].spec != (None, None, None, None)     # really sharded
    assert np.abs(np.asarray(_zj_logits(model3, IDS)) - want).max() <= TOL

    # Export from the sharded params; transformers loads it and gives the same logits.
    out = str(tmp_path / "export")
    assert hf.save_pretrained(params3, model3.cfg, out) == ["model.safetensors", "config.json"]
    back = _hf_load(out, transformers.LlamaForCausalLM)
    assert np.abs(_hf_logits(back) - want).max() <= TOL
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]    # nothing left over


def test_llama_bf16_export_loads_in_transformers(llama, tmp_path):
    hf_model, path, want = llama
    _, params = hf.load_pretrained(path)
    out = str(tmp_path / "bf16")
    hf.save_pretrained(params, hf.load_config(path), out, dtype="bfloat16")
    assert json.loads(open(os.path.join(out, "config.json")).read())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == BF16 for t in load_file(os.path.join(out, "model.safetensors")).values())
    back = _hf_load(out, transformers.LlamaForCausalLM)
    original = hf_model.state_dict()
    for name, value in back.state_dict().items():
        torch.testing.assert_close(value, original[name].bfloat16().float(), rtol=0, atol=0)
    # And zerojax reads its own bf16 export back (upcast to fp32).
    model, _ = hf.load_pretrained(out)
    assert np.abs(np.asarray(_zj_logits(model, IDS)) - _hf_logits(back)).max() <= TOL


def test_tied_llama_from_a_sharded_index(tmp_path):
    hf_model = _hf_llama(tied=True)
    path = str(tmp_path / "hf")
    hf_model.save_pretrained(path, max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    want = _hf_logits(hf_model)
    model, params = hf.load_pretrained(path, shardings=_zero3_shardings(path))
    assert model.cfg.tie_word_embeddings and "lm_head" not in params
    assert np.abs(np.asarray(_zj_logits(model, IDS)) - want).max() <= TOL

    out = str(tmp_path / "export")
    files = hf.save_pretrained(params, hf.model_section(path), out, max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in files and len(files) > 3
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert "lm_head.weight" not in index["weight_map"]
    back = _hf_load(out, transformers.LlamaForCausalLM)
    assert back.config.tie_word_embeddings
    assert np.abs(_hf_logits(back) - want).max() <= TOL


@pytest.mark.parametrize("shard", [None, "50KB"])
def test_gpt2_logits_both_ways(tmp_path, shard):
    hf_model = _hf_gpt2()
    path = str(tmp_path / "hf")
    hf_model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) == bool(shard)
    want = _hf_logits(hf_model)
    shardings = _zero3_shardings(path) if shard else None
    model, params = hf.load_pretrained(path, shardings=shardings)
    assert hf.model_section(path)["type"] == "gpt2"
    assert np.abs(np.asarray(_zj_logits(model, IDS)) - want).max() <= TOL

    out = str(tmp_path / "export")
    hf.save_pretrained(params, model.cfg, out, max_shard_bytes=60_000 if shard else 10**9)
    back = _hf_load(out, transformers.GPT2LMHeadModel)
    assert np.abs(_hf_logits(back) - want).max() <= TOL


def test_gpt2_names_without_transformer_prefix(tmp_path):
    """Older GPT-2 exports: `h.0.attn.c_attn.weight` and causal-mask buffers `h.0.attn.bias`."""
    hf_model = _hf_gpt2()
    path = str(tmp_path / "hf")
    hf_model.save_pretrained(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    save_file(old, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model, _ = hf.load_pretrained(path)
    assert np.abs(np.asarray(_zj_logits(model, IDS)) - _hf_logits(hf_model)).max() <= TOL


def test_model_section_builds_the_same_model(llama):
    _, path, _ = llama
    section = hf.model_section(path)
    assert section["type"] == "llama" and section["rope_theta"] == 5000.0
    assert section["num_key_value_heads"] == 2 and section["rms_norm_eps"] == 1e-5
    built = nnx.eval_shape(lambda: build(section, nnx.Rngs(0)))
    _, params = hf.load_pretrained(path)
    shapes = lambda tree: jax.tree.map(np.shape, tree)
    assert shapes(nnx.to_pure_dict(nnx.state(built, nnx.Param))) == shapes(params)


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    cfg = json.load(open(file))
    cfg.update(changes)
    json.dump(cfg, open(file, "w"))


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_rejected(llama, tmp_path, changes, message):
    _, path, _ = llama
    copy = tmp_path / "m"
    copy.mkdir()
    (copy / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    _edit_config(str(copy), **changes)
    with pytest.raises(CheckpointError, match=message):
        hf.load_config(str(copy))


def test_bad_directories_are_checkpoint_errors(llama, tmp_path):
    _, path, _ = llama
    config = open(os.path.join(path, "config.json")).read()
    tensors = load_file(os.path.join(path, "model.safetensors"))

    def directory(name, files):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config)
        for file, content in files.items():
            save_file(content, str(d / file)) if isinstance(content, dict) else (d / file).write_bytes(content)
        return str(d)

    with pytest.raises(CheckpointError, match="no such model directory"):
        hf.load_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="only safetensors and never unpickles"):
        hf.load_pretrained(directory("pickle", {"pytorch_model.bin": b"\x80\x04not read"}))
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        hf.load_pretrained(directory("missing", {"model.safetensors": missing}))
    extra = dict(tensors, **{"model.layers.2.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(CheckpointError, match="does not describe.*model.layers.2"):
        hf.load_pretrained(directory("extra", {"model.safetensors": extra}))
    wrong = dict(tensors, **{"lm_head.weight": np.zeros((120, 64), np.float32)})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'lm_head.weight' has shape \[120, 64\]"):
        hf.load_pretrained(directory("shape", {"model.safetensors": wrong}))
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        hf.load_pretrained(directory("truncated", {"model.safetensors": data[:len(data) // 2]}))


def test_save_rejects_params_that_do_not_fit(llama, tmp_path):
    _, path, _ = llama
    _, params = hf.load_pretrained(path)
    params = dict(params)
    del params["lm_head"]
    with pytest.raises(ValueError, match="lm_head"):
        hf.save_pretrained(params, hf.load_config(path), str(tmp_path / "out"))


@pytest.mark.slow
def test_fine_tune_from_hf_then_export_with_the_cli(llama, tmp_path):
    """HF dir -> directly sharded ZeRO-3 engine -> train -> checkpoint -> `zerojax export --hf` -> HF."""
    import zerojax
    from zerojax.cli import main

    _, path, hf_logits = llama
    engine = zerojax.initialize(
        model_fn=lambda rngs: build(hf.model_section(path), rngs),
        config={"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    engine.set_params(hf.load_params(path, shardings=engine.state_shardings.params))
    np.testing.assert_allclose(np.asarray(_zj_logits(engine.model(), IDS)), hf_logits, atol=TOL, rtol=0)
    engine.train_step({"input_ids": np.tile(IDS, (4, 1))})
    engine.save_checkpoint(str(tmp_path / "ckpt"))

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--hf"]) == 0
    exported = _hf_logits(_hf_load(str(tmp_path / "hf"), transformers.LlamaForCausalLM))
    trained = np.asarray(_zj_logits(engine.model(), IDS))
    np.testing.assert_allclose(exported, trained, atol=TOL, rtol=0)
    assert np.abs(trained - hf_logits).max() > 1e-3     # it did train


def test_cli_export_of_a_missing_checkpoint_exits_2(tmp_path, capsys):
    from zerojax.cli import main

    assert main(["export", str(tmp_path / "none"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


@pytest.mark.slow
def test_train_fine_tunes_from_an_hf_directory(llama, tmp_path):
    """`"model": {"init_from": HF_DIR}`: the first step's loss is the HF model's own loss."""
    import zerojax

    hf_model, path, _ = llama
    ids = np.tile(IDS, (4, 1))
    with torch.no_grad():
        hf_loss = float(hf_model(torch.tensor(ids, dtype=torch.long), labels=torch.tensor(ids, dtype=torch.long)).loss)
    config = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zerojax": {"model": {"type": "llama", "init_from": path}, "data": {"seq_len": 16}}}
    zerojax.train(None, config, data=[{"input_ids": ids}], steps=1, out=str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert abs(first["loss"] - hf_loss) <= 1e-4
