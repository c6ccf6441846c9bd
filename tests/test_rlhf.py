"""RLHF: the losses against hand-written formulas, the data files (errors, cuts, epochs),
and SFT end to end on the shipped toy data (the model's own loss is the masked SFT loss)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zerojax
from zerojax.config import ConfigError
from zerojax.inference.tokenizer import ByteTokenizer
from zerojax.models import Llama, LlamaConfig
from zerojax.rlhf import data as rdata, losses
from zerojax.rlhf.settings import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_CONFIG = os.path.join(ROOT, "configs", "rlhf", "sft.json")


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    B, L, V = 3, 7, 11
    logits = rng.standard_normal((B, L, V)).astype(np.float32) * 2
    ids = rng.integers(0, V, (B, L)).astype(np.int32)
    mask = np.zeros((B, L), np.int32)
    mask[0, 3:6], mask[1, 1:7], mask[2, 5:6] = 1, 1, 1        # response spans; row 0 has a padded tail
    return logits, ids, mask


def _hand_logps(logits, ids, mask):
    """Per sequence: sum over response tokens t of log p(ids[t] | position t-1)."""
    logp = _log_softmax(logits)
    return np.array([sum(logp[b, t - 1, ids[b, t]] for t in range(1, ids.shape[1]) if mask[b, t])
                     for b in range(ids.shape[0])])


def test_response_logps_and_sft_loss_equal_the_hand_formula(arrays):
    logits, ids, mask = arrays
    np.testing.assert_allclose(losses.response_logps(logits, ids, mask), _hand_logps(logits, ids, mask), rtol=1e-5)
    want = -_hand_logps(logits, ids, mask).sum() / mask[:, 1:].sum()
    np.testing.assert_allclose(losses.sft_loss(logits, ids, mask), want, rtol=1e-5)


def test_sft_gives_prompt_and_padding_positions_zero_gradient(arrays):
    logits, ids, mask = arrays
    grad = jax.grad(losses.sft_loss)(jnp.asarray(logits), ids, mask)
    predicts_response = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1).astype(bool)
    assert np.all(np.asarray(grad)[~predicts_response] == 0.0)
    assert np.all(np.abs(np.asarray(grad)[predicts_response]).sum(-1) > 0)


def test_the_models_masked_loss_is_the_sft_loss(arrays):
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    _, ids, mask = arrays
    ids = ids % 32
    both = jax.jit(lambda ids, mask: (model({"input_ids": ids, "loss_mask": mask}),
                                      losses.sft_loss(model.logits(ids), ids, mask)))
    got, want = both(ids, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pairwise_reward_loss():
    chosen, rejected = np.array([1.0, -0.5, 2.0, 0.1]), np.array([0.0, 0.5, -1.0, 0.1])
    loss, m = losses.pairwise_reward_loss(chosen, rejected)
    d = chosen - rejected
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-d))), rtol=1e-6)
    assert float(m["accuracy"]) == 0.5 and math.isclose(float(m["margin"]), d.mean(), rel_tol=1e-6)


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_dpo_loss_and_metrics_equal_the_formula(loss_type):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.standard_normal(5) * 3 - 10 for _ in range(4))
    beta, eps = 0.3, 0.1
    loss, m = losses.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    h = (pc - rc) - (pr - rr)
    logsig = lambda x: -np.log1p(np.exp(-x))
    want = {"sigmoid": -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h),
            "ipo": (h - 1 / (2 * beta)) ** 2, "hinge": np.maximum(0, 1 - beta * h)}[loss_type]
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"], (beta * (pc - rc)).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/rejected"], (beta * (pr - rr)).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], (beta * h).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/accuracies"], (h > 0).mean())
    np.testing.assert_allclose(m["logps/chosen"], pc.mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        losses.dpo_loss(pc, pr, rc, rr, loss_type="kto")


# ---------------------------------------------------------------- data
def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("line, needle", [
    ("{not json", ":2: not valid JSON"),
    ("[1, 2]", ":2: expected a JSON object"),
    ({"prompt": "x"}, ":2: missing field 'response'"),
    ({"prompt": "x", "response": 3}, ":2: field 'response' must be a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}, "role 'assistant'"),
])
def test_bad_sft_lines_name_file_and_line(tmp_path, line, needle):
    path = _write(tmp_path, [{"prompt": "a", "response": "b"}, line])
    with pytest.raises(rdata.DataError, match=needle.replace("[", r"\[")) as e:
        rdata.sft_examples(path, ByteTokenizer(), max_prompt_len=8, max_len=16)
    assert path in str(e.value)


def test_cuts_drops_and_messages_are_counted(tmp_path):
    path = _write(tmp_path, [
        {"prompt": "p" * 30, "response": "r"},                                          # prompt cut
        {"prompt": "ab", "response": "x" * 50},                                         # response cut
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ])
    examples, report = rdata.sft_examples(path, ByteTokenizer(), max_prompt_len=24, max_len=40)
    assert (report.prompts_cut, report.responses_cut, report.examples) == (1, 1, 3)
    assert examples[0][0] == list(b"p" * 24) and len(examples[1][0]) + len(examples[1][1]) == 40
    assert bytes(examples[2][0]) == b"user: hi\nassistant:" and bytes(examples[2][1]) == b"yo"
    assert "1 prompts cut" in report.summary() and "1 responses cut" in report.summary()

    pairs = _write(tmp_path, [{"prompt": "q", "chosen": "same", "rejected": "same"},
                              {"prompt": "q", "chosen": "good", "rejected": "bad"}], "pairs.jsonl")
    kept, report = rdata.preference_pairs(pairs, ByteTokenizer(), max_prompt_len=8, max_len=16)
    assert len(kept) == 1 and report.dropped_identical == 1 and "chosen equals rejected" in report.summary()
    only_same = _write(tmp_path, [{"prompt": "q", "chosen": "s", "rejected": "s"}], "same.jsonl")
    with pytest.raises(rdata.DataError, match="no usable examples"):
        rdata.preference_pairs(only_same, ByteTokenizer(), max_prompt_len=8, max_len=16)


def test_batches_cover_every_example_each_epoch_and_resume():
    examples = list(range(10))
    batches = rdata.ExampleBatches(examples, 4, lambda rows: {"x": np.array(rows)}, seed=3,
                                   process_index=0, process_count=1)
    seen = np.concatenate([batches.next()["x"] for _ in range(5)])             # 20 rows = 2 epochs
    assert sorted(seen[:10]) == examples and sorted(seen[10:]) == examples
    assert list(seen[:10]) != list(seen[10:])                                  # reshuffled
    again = rdata.ExampleBatches(examples, 4, lambda rows: {"x": np.array(rows)}, seed=0,
                                 process_index=0, process_count=1)
    again.restore({"index": 3, "seed": 3})
    assert list(again.next()["x"]) == list(seen[12:16])


def test_settings_reject_another_algorithms_key_and_bad_lengths():
    assert settings({"data": "d.jsonl"}, "dpo")["beta"] == 0.1
    with pytest.raises(ConfigError, match="zerojax.rlhf.beta does not apply to sft"):
        settings({"beta": 0.2}, "sft")
    with pytest.raises(ConfigError, match="unknown key"):
        settings({"betta": 0.2}, "dpo")
    with pytest.raises(ConfigError, match="max_prompt_len .* must be below max_len"):
        settings({"max_prompt_len": 64, "max_len": 64}, "sft")


# ---------------------------------------------------------------- SFT end to end
def test_sft_on_the_toy_data_lowers_the_response_loss(tmp_path):
    config = json.load(open(SFT_CONFIG))
    config["zerojax"]["rlhf"]["data"] = os.path.join(ROOT, "configs", "rlhf", "sft.jsonl")
    config["zerojax"]["train"].update(steps=30, log_every=5, checkpoint_every=0)
    summary = zerojax.rlhf.sft(config, out=str(tmp_path / "sft"))
    records = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    losses_ = [r["loss"] for r in records if "loss" in r]
    assert summary["steps"] == 30 and losses_[-1] < 0.5 * losses_[0], losses_
    assert summary["data"]["examples"] == 256
    from zerojax import inference                            # the result is a normal checkpoint
    pipe = inference.pipeline(str(tmp_path / "sft"), token_budget=16, max_seqs=2, num_pages=16, page_size=16)
    reply = pipe(["User: Please feed the cat.\nBot:"], max_new_tokens=12, temperature=0.0)[0].generated_text
    assert reply.startswith(" "), reply                     # learnt the replies' leading space at least


def test_rlhf_cli_bad_data_exits_2_with_the_line(tmp_path):
    bad = _write(tmp_path, [{"prompt": "a", "response": "b"}, "{oops"])
    run = subprocess.run([sys.executable, "-m", "zerojax.cli", "rlhf", "sft", SFT_CONFIG, "--out",
                          str(tmp_path / "o"), "--set", f"zerojax.rlhf.data={bad}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert f"{bad}:2: not valid JSON" in run.stderr
    assert not os.path.exists(tmp_path / "o" / "latest")


# ---------------------------------------------------------------- DPO
DPO_CONFIG = os.path.join(ROOT, "configs", "rlhf", "dpo.json")
DPO_MODEL = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def pair_batches():
    from zerojax.rlhf.dpo import collate_pairs
    pairs, _ = rdata.preference_pairs(os.path.join(ROOT, "configs", "rlhf", "pairs.jsonl"), ByteTokenizer(),
                                      max_prompt_len=32, max_len=64)
    batches = rdata.ExampleBatches(pairs, 8, collate_pairs(64), seed=0, process_index=0, process_count=1)
    return [batches.next() for _ in range(3)]


def _dpo_engine(devices, stage: int, mesh: dict | None = None):
    from zerojax.rlhf.dpo import PolicyAndReference

    def model_fn(rngs):
        policy = Llama(DPO_MODEL, rngs=rngs)
        return PolicyAndReference(policy, nnx.clone(policy), beta=0.2)

    config = {"train_batch_size": 8, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
              "zerojax": {"mesh": mesh or {}}}
    return zerojax.initialize(model_fn=model_fn, config=config, devices=devices)


def test_dpo_step_is_the_formula_on_policy_and_reference_logps(pair_batches):
    engine = _dpo_engine(jax.devices()[:1], 0)
    policy = engine.params["policy"]
    engine.set_params({"policy": policy, "reference": policy})     # one buffer, two names: still steps
    batch = pair_batches[0]
    model = engine.model()
    ids = np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    logps = np.asarray(losses.response_logps(model.policy.logits(ids), ids, mask))
    ref = np.asarray(losses.response_logps(model.reference.logits(ids), ids, mask))
    np.testing.assert_array_equal(logps, ref)                 # the reference starts as the policy
    h = (logps[:8] - ref[:8]) - (logps[8:] - ref[8:])
    metrics = engine.train_step(batch)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(np.log1p(np.exp(-0.2 * h))), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logps/chosen"]), logps[:8].mean(), rtol=1e-5)


def test_dpo_under_zero3_and_tensor_parallel_equals_one_device_and_the_reference_never_moves(pair_batches):
    runs = {"one device": _dpo_engine(jax.devices()[:1], 0), "zero3 x8": _dpo_engine(None, 3),
            "tensor 2, zero1": _dpo_engine(None, 1, {"tensor": 2})}
    start = jax.device_get(runs["one device"].params)
    results = {}
    for name, engine in runs.items():
        got = [float(engine.train_step(b)["loss"]) for b in pair_batches]
        results[name] = (got, jax.device_get(engine.params))
    base_losses, base_params = results["one device"]
    for name, (got, params) in results.items():
        np.testing.assert_allclose(got, base_losses, rtol=1e-4, atol=1e-5, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name),
                     params["policy"], base_params["policy"])
        jax.tree.map(np.testing.assert_array_equal, params["reference"], start["reference"])   # bitwise
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), base_params["policy"], start["policy"]))
    assert max(moved) > 1e-4                                    # the policy did train
    assert len(jax.tree.leaves(runs["zero3 x8"].state.opt_state)) < 2 * len(jax.tree.leaves(start))  # policy only


def test_dpo_on_the_toy_data_prefers_chosen_and_precomputed_reference_agrees(tmp_path):
    config = json.load(open(DPO_CONFIG))
    config["zerojax"]["rlhf"]["data"] = os.path.join(ROOT, "configs", "rlhf", "pairs.jsonl")
    config["zerojax"]["train"].update(steps=15, log_every=1, checkpoint_every=0)
    zerojax.rlhf.dpo(config, out=str(tmp_path / "a"))
    config["zerojax"]["rlhf"]["precompute_ref"] = True
    config["zerojax"]["train"]["steps"] = 3
    zerojax.rlhf.dpo(config, out=str(tmp_path / "b"))
    read = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line]
    a, b = read("a"), read("b")
    assert a[-1]["rewards/accuracies"] > 0.9 and a[-1]["rewards/margins"] > a[0]["rewards/margins"]
    for x, y in zip(a[:3], b):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5, abs_tol=1e-6), (x["loss"], y["loss"])

    # The checkpoint is the policy's: it exports (and serves, and is an init_from) as the model.
    from zerojax import checkpoint
    root = str(tmp_path / "a")
    tag = checkpoint.latest_tag(root)
    policy = checkpoint.read_param(root, tag, "policy.embed_tokens", [256, 64], "float32")
    reference = checkpoint.read_param(root, tag, "reference.embed_tokens", [256, 64], "float32")
    assert np.abs(policy - reference).max() > 1e-4
    run = subprocess.run([sys.executable, "-m", "zerojax.cli", "export", root, str(tmp_path / "hf"), "--hf"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    from safetensors.numpy import load_file
    np.testing.assert_array_equal(load_file(str(tmp_path / "hf" / "model.safetensors"))["model.embed_tokens.weight"],
                                  policy)


# ---------------------------------------------------------------- reward model
def test_reward_model_learns_the_preference_and_exports_to_hf_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from zerojax.rlhf import RewardModel
    from zerojax.rlhf.reward import collate_scored_pairs

    config = json.load(open(os.path.join(ROOT, "configs", "rlhf", "reward.json")))
    config["zerojax"]["rlhf"]["data"] = os.path.join(ROOT, "configs", "rlhf", "pairs.jsonl")
    config["zerojax"]["train"].update(steps=25, log_every=5, checkpoint_every=0)
    zerojax.rlhf.reward(config, out=str(tmp_path / "rm"))
    records = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl") if '"loss"' in line]
    assert records[-1]["accuracy"] > 0.9 and records[-1]["margin"] > records[0]["margin"], records[-1]

    run = subprocess.run([sys.executable, "-m", "zerojax.cli", "export", str(tmp_path / "rm"), str(tmp_path / "hf"),
                          "--hf"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1

    pairs, _ = rdata.preference_pairs(os.path.join(ROOT, "configs", "rlhf", "pairs.jsonl"), ByteTokenizer(),
                                      max_prompt_len=64, max_len=128)
    batch = collate_scored_pairs(128)(pairs[:4])
    engine = zerojax.initialize(model_fn=lambda r: RewardModel(Llama(LlamaConfig(**{
        k: v for k, v in config["zerojax"]["model"].items() if k != "type"}), rngs=r), rngs=r),
        config={"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
        devices=jax.devices()[:1])
    engine.load_checkpoint(str(tmp_path / "rm"), load_module_only=True)
    ours = np.asarray(jax.jit(lambda ids, n: engine.model().scores(ids, n))(batch["chosen_ids"],
                                                                            batch["chosen_lengths"]))
    with torch.no_grad():
        theirs = hf(torch.tensor(batch["chosen_ids"], dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
