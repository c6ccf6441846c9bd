"""T5: Hugging Face parity (v1.0 and v1.1, both ways), cached greedy decoding vs HF `generate`,
ZeRO-3 / TP against a single device, seq2seq data and fine-tuning on a toy task."""
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import zerojax
from tests.helpers import relative_error
from zerojax import hf, seq2seq
from zerojax.config import ConfigError
from zerojax.inference.tokenizer import ByteTokenizer
from zerojax.models import T5, T5Config, build
from zerojax.models.t5 import greedy_generate, load_for_generation, relative_position_buckets
from zerojax.rlhf.data import DataError

torch.set_num_threads(2)
TOL = 1e-4
RNG = np.random.default_rng(0)
IDS = RNG.integers(2, 128, (2, 12)).astype(np.int32)
MASK = np.ones_like(IDS)
MASK[1, 9:] = 0                                         # a padded source row
LABELS = RNG.integers(2, 128, (2, 7)).astype(np.int32)
LABELS[0, 5:] = -100                                    # ignored targets


def _hf_t5(v11: bool):
    """Tiny random HF T5: v1.0 (relu, tied + rescaled head, 3 decoder layers) or v1.1
    (gated-gelu, untied head, no rescale); few buckets so long distances are exercised."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2 if v11 else 3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if v11 else "relu", tie_word_embeddings=not v11,
        decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg)
    if v11:     # transformers 5.x ties every T5 head; a different lm_head stays untied on reload
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():       # off the init everywhere (norms at 1 would hide mix-ups)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_out(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK),
                     labels=torch.tensor(LABELS, dtype=torch.long))


def _zj(model):
    """(logits of the HF-shifted labels, (loss, metrics)) of a zerojax T5, jitted."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        batch = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
        from zerojax.models.t5 import shift_right
        return m.logits(IDS, shift_right(LABELS, m.cfg), MASK), m(batch)

    return run(state)


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def hf_dir(request, tmp_path_factory):
    model = _hf_t5(request.param == "v1.1")
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return request.param, model, path, _hf_out(model)


def test_relative_position_buckets_match_hf():
    """Every distance up to +-300 in T5's default geometry, both directions (the log is fp32
    in both, so boundary distances land in the same bucket)."""
    relative = torch.arange(-300, 300)[None]
    buckets = jax.jit(relative_position_buckets, static_argnames=("bidirectional", "num_buckets", "max_distance"))
    for bidirectional in (True, False):
        want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            relative, bidirectional=bidirectional, num_buckets=32, max_distance=128).numpy()
        got = buckets(relative.numpy().astype(np.int32), bidirectional=bidirectional, num_buckets=32,
                      max_distance=128)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_hf_logits_and_loss_both_ways(hf_dir, tmp_path):
    version, hf_model, path, want = hf_dir
    model, params = hf.load_pretrained(path)
    v11 = version == "v1.1"
    assert model.cfg.tie_word_embeddings is (not v11) and model.cfg.scale_decoder_outputs is (not v11)
    assert ("lm_head" in params) is v11 and model.cfg.is_gated is v11
    logits, (loss, metrics) = _zj(model)
    assert np.abs(np.asarray(logits) - want.logits.numpy()).max() <= TOL
    assert abs(float(loss) - float(want.loss)) <= TOL * max(1.0, float(want.loss))
    assert int(metrics["target_tokens"]) == int((LABELS != -100).sum())

    out = str(tmp_path / "export")
    hf.save_pretrained(params, model.cfg, out)
    back, info = transformers.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert np.abs(_hf_out(back.eval()).logits.numpy() - want.logits.numpy()).max() <= TOL
    assert hf.load_config(out) == model.cfg
    assert hf.model_section(path)["type"] == "t5"


# HF's generate needs as many decoder as encoder layers; the v1.0 model here has 3 vs 2.
@pytest.mark.parametrize("hf_dir", ["v1.1"], indirect=True)
def test_greedy_generation_equals_hf_generate(hf_dir):
    version, hf_model, path, _ = hf_dir
    model, _ = hf.load_pretrained(path)
    ids, mask = torch.tensor(IDS, dtype=torch.long), torch.tensor(MASK)
    mine = greedy_generate(model, IDS, MASK, max_new_tokens=8)
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                   max_new_tokens=8).numpy()
    np.testing.assert_array_equal(mine, theirs)
    assert mine.shape == (2, 9) and (mine[:, 0] == 0).all()
    # An EOS the first row emits: it is padded after it, the other row runs on (same program).
    eos = int(mine[0, 2])
    mine = greedy_generate(model, IDS, MASK, max_new_tokens=8, eos_token_id=eos)
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                   max_new_tokens=8, eos_token_id=eos).numpy()
    np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("hf_dir", ["v1.1"], indirect=True)
def test_zerojax_generate_command_decodes_a_t5(hf_dir, capsys):
    """`zerojax generate HF_DIR --prompt ...` on a T5: HF's greedy tokens, cut at EOS, as text."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from zerojax import cli
    version, hf_model, path, _ = hf_dir
    words = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w2"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(f"{path}/tokenizer.json")
    prompt = "w5 w9 w17 w33 w64"
    assert cli.main(["generate", path, "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    ids = torch.tensor([[5, 9, 17, 33, 64, 1]])                 # T5's tokenizer appends EOS (1)
    with torch.no_grad():
        want = hf_model.generate(input_ids=ids, do_sample=False, num_beams=1, max_new_tokens=6)[0, 1:].tolist()
    want = want[:want.index(1)] if 1 in want else want
    assert want, "HF ended at once: the comparison would be empty"
    assert capsys.readouterr().out.split() == [f"w{i}" for i in want]


# ----------------------------------------------------------------------------- training

TINY = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16)
ROWS, LEN = 16, 8


def tiny_t5(rngs):
    return T5(TINY, rngs=rngs)


def t5_config(stage, tensor=1, **extra):
    return {"train_batch_size": ROWS, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "tensor_parallel": {"autotp_size": tensor}, **extra}


@pytest.fixture(scope="module")
def reverse_batches(tmp_path_factory):
    """A reverse task ("abcd" -> "dcba") read through the seq2seq JSONL module."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("seq2seq") / "reverse.jsonl"
    with open(path, "w") as f:
        for _ in range(64):
            text = "".join(rng.choice(list("abcdefgh"), rng.integers(3, 7)))
            f.write(json.dumps({"source": text, "target": text[::-1]}) + "\n")
    data = seq2seq.batches_from_file(str(path), ByteTokenizer(), ROWS, max_source_len=LEN, max_target_len=LEN)
    return [data.next() for _ in range(30)]


@pytest.fixture(scope="module")
def single_device(reverse_batches):
    """Losses, eval loss and params after 3 steps on one device (the first of the 8)."""
    engine = zerojax.initialize(model_fn=tiny_t5, config=t5_config(0, zerojax={"mesh": {"data": 1}}))
    assert engine.mesh.devices.size == 1
    losses = [float(engine.train_step(b)["loss"]) for b in reverse_batches[:3]]
    return np.array(losses), float(engine.eval_step(reverse_batches[3])), jax.device_get(engine.state.params)


def test_zero3_on_8_devices_matches_one_device_and_learns_the_task(reverse_batches, single_device, tmp_path):
    ref_losses, ref_eval, ref_params = single_device
    engine = zerojax.initialize(model_fn=tiny_t5, config=t5_config(3))
    assert engine.mesh.shape["data"] == 8
    q_proj = engine.state.params["decoder"]["layers"]["cross_q_proj"]
    assert q_proj.addressable_shards[0].data.size == q_proj.size // 8          # really ZeRO-3 sharded
    losses = [float(engine.train_step(b)["loss"]) for b in reverse_batches[:3]]
    np.testing.assert_allclose(losses, ref_losses, atol=2e-5, rtol=0)
    assert relative_error(engine.state.params, ref_params) <= 1e-5
    assert abs(float(engine.eval_step(reverse_batches[3])) - ref_eval) <= 2e-5
    # Fine-tuning on the reverse task: a few dozen steps more halve the loss at least.
    losses += [float(engine.train_step(b)["loss"]) for b in reverse_batches[3:]]
    assert losses[-1] < 0.5 * losses[0], losses

    # Its checkpoint rebuilds the T5 for `zerojax generate` and exports to a HF directory.
    engine.save_checkpoint(str(tmp_path / "run"))
    model, tokenizer = load_for_generation(str(tmp_path / "run"))
    assert model.cfg == TINY and tokenizer is None                  # vocab 128: no byte tokenizer
    assert relative_error(nnx.to_pure_dict(nnx.state(model, nnx.Param)), engine.state.params) == 0
    hf.export_checkpoint_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert hf.load_config(str(tmp_path / "hf")) == TINY


def test_tensor_parallel_2_matches_one_device(reverse_batches, single_device):
    ref_losses, _, _ = single_device
    engine = zerojax.initialize(model_fn=tiny_t5, config=t5_config(1, tensor=2))
    assert engine.mesh.shape["tensor"] == 2
    q_proj = engine.state.params["encoder"]["layers"]["q_proj"]
    assert q_proj.addressable_shards[0].data.size == q_proj.size // 2          # heads split
    losses = [float(engine.train_step(b)["loss"]) for b in reverse_batches[:3]]
    np.testing.assert_allclose(losses, ref_losses, atol=1e-4, rtol=0)


def test_pipeline_parallelism_refuses_encoder_decoder_clearly():
    with pytest.raises(ConfigError, match="T5 has no embed, run_layers, head_loss"):
        zerojax.initialize(model_fn=tiny_t5, config={**t5_config(0), "pipeline": {"stages": 2},
                                                     "gradient_accumulation_steps": 2}, abstract=True)


# ----------------------------------------------------------------------------- data and config

class _EosTokenizer(ByteTokenizer):
    eos_token_ids = (1,)


def test_seq2seq_data_pads_truncates_and_resumes(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"source": "abcdefghij", "target": "xy"}) + "\n\n"
                    + json.dumps({"source": "a", "target": "0123456789"}) + "\n")
    examples = seq2seq.read_examples(str(path), _EosTokenizer(), max_source_len=6, max_target_len=4)
    assert examples == [([97, 98, 99, 100, 101, 1], [120, 121, 1]), ([97, 1], [48, 49, 50, 1])]
    batch = seq2seq.pad_batch(examples, max_source_len=6, max_target_len=4)
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 6, [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["input_ids"][1], [97, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["labels"], [[120, 121, 1, -100], [48, 49, 50, 1]])
    plain = seq2seq.read_examples(str(path), ByteTokenizer(), max_source_len=6, max_target_len=4)
    assert plain[0] == ([97, 98, 99, 100, 101, 102], [120, 121])              # no EOS in bytes

    data = seq2seq.Seq2SeqBatches(examples * 3, 4, max_source_len=6, max_target_len=4, seed=5,
                                  process_index=1, process_count=2)
    assert data.next()["input_ids"].shape == (2, 6)
    state, expected = data.state(), data.next()
    again = seq2seq.Seq2SeqBatches(examples * 3, 4, max_source_len=6, max_target_len=4,
                                   process_index=1, process_count=2)
    again.restore(state)
    resumed = again.next()
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key])

    path.write_text(json.dumps({"source": "a", "response": "b"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: expected a string 'target'"):
        seq2seq.read_examples(str(path), ByteTokenizer(), max_source_len=6, max_target_len=4)


def test_built_from_a_config_section():
    from zerojax.config import Config
    from zerojax.trainer import model_fn_from_config
    section = {"type": "t5", "vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
               "num_heads": 2, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    config = Config.load({"train_batch_size": 8, "zerojax": {"model": section}})
    model_fn, resolved = model_fn_from_config(config)
    model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))           # shapes only: nothing to compute
    assert isinstance(model, T5) and model.cfg.num_decoder_layers == 1 and not model.cfg.scale_decoder_outputs
    assert model.decoder.layers.wi_0.shape == (1, 16, 32) and model.lm_head.shape == (16, 64)
    assert isinstance(nnx.eval_shape(lambda: build(section, nnx.Rngs(0))), T5)
    assert T5Config(eos_token_id=[1]).eos_token_id == 1                        # HF's one-id list
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-relu-x")
    with pytest.raises(ValueError, match="unsupported T5 batch keys"):
        model({"input_ids": np.zeros((1, 4), np.int32), "labels": np.zeros((1, 4), np.int32),
               "decoder_input_ids": np.zeros((1, 4), np.int32)})
