"""RLHF: the losses against hand-written formulas, the data files (errors, cuts, epochs, EOS),
SFT, DPO and the reward model end to end on the shipped toy data, DPO across layouts and in
bf16, resume, and the reward model's export to Hugging Face (Llama and GPT-2)."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zerojax
from zerojax import cli
from zerojax.config import Config, ConfigError
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


def _char_tokenizer_dir(directory, text: str) -> str:
    """A HF `tokenizer.json` of one token per character (pad 0, EOS "</s>" 1), as a model directory has."""
    import tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(text)))}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), "isolated")
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    return str(directory)


def test_responses_end_with_the_tokenizers_eos_and_the_byte_tokenizer_appends_nothing(tmp_path):
    from zerojax.inference.tokenizer import HFTokenizer

    sft = _write(tmp_path, [{"prompt": "ab", "response": "cd"}, {"prompt": "ab", "response": "cdcdc"},
                            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "dc"}]}])
    pairs = _write(tmp_path, [{"prompt": "ab", "chosen": "cd", "rejected": "dc"}], "pairs.jsonl")
    hf = HFTokenizer(_char_tokenizer_dir(tmp_path / "tok", "abcd user:\nassistant"))
    eos = hf.eos_token_ids[0]
    assert eos == 1
    examples, report = rdata.sft_examples(sft, hf, max_prompt_len=4, max_len=7)
    assert examples[0] == (hf.encode("ab"), hf.encode("cd") + [eos])
    assert examples[1][1] == hf.encode("cdcdc") and report.responses_cut == 1     # EOS counts against max_len
    assert examples[2][1] == hf.encode("dc") + [eos]
    (prompt, chosen, rejected), = rdata.preference_pairs(pairs, hf, max_prompt_len=4, max_len=7)[0]
    assert (chosen, rejected) == (hf.encode("cd") + [eos], hf.encode("dc") + [eos])

    assert rdata.sft_examples(sft, ByteTokenizer(), max_prompt_len=4, max_len=7)[0][0] == (list(b"ab"), list(b"cd"))
    (_, chosen, rejected), = rdata.preference_pairs(pairs, ByteTokenizer(), max_prompt_len=4, max_len=7)[0]
    assert (chosen, rejected) == (list(b"cd"), list(b"dc"))


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
@pytest.mark.slow
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
    pipe = inference.pipeline(str(tmp_path / "sft"), token_budget=32, max_seqs=1, num_pages=16, page_size=16,
                              warmup=False)                 # compile only the step shapes this reply uses
    reply = pipe(["User: Please feed the cat.\nBot:"], max_new_tokens=1, temperature=0.0)[0].generated_text
    assert reply.startswith(" "), reply                     # learnt the replies' leading space at least


def test_rlhf_cli_bad_data_exits_2_with_the_line(tmp_path, capsys):
    bad = _write(tmp_path, [{"prompt": "a", "response": "b"}, "{oops"])
    code = cli.main(["rlhf", "sft", SFT_CONFIG, "--out", str(tmp_path / "o"), "--set", f"zerojax.rlhf.data={bad}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{bad}:2: not valid JSON" in err
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


@pytest.fixture(scope="module")
def dpo_model():
    """One policy/reference pair every layout starts from, built once on the host: each engine
    then only places it (no init program to compile per layout)."""
    from zerojax.rlhf.dpo import PolicyAndReference

    policy = Llama(DPO_MODEL, rngs=nnx.Rngs(0))
    return PolicyAndReference(policy, nnx.clone(policy), beta=0.2)


def _dpo_engine(model, devices, stage: int, mesh: dict | None = None, bf16: bool = False):
    # Threshold 0: the tiny model's params are below DeepSpeed's default persistence
    # threshold and would otherwise stay whole on every device under ZeRO-3.
    config = {"train_batch_size": 8, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
              "bf16": {"enabled": bf16}, "zerojax": {"mesh": mesh or {}}}
    return zerojax.initialize(model, config, devices=devices)


def _train(engine, batches) -> dict:
    """Params before and after, and the loss of each step."""
    start = jax.device_get(engine.params)
    got = [float(engine.train_step(b)["loss"]) for b in batches]
    return {"start": start, "losses": got, "params": jax.device_get(engine.params)}


@nnx.jit
def _both_logps(model, ids, mask):
    """The policy's and the reference's response log-probs, in one compiled program."""
    return (losses.response_logps(model.policy.logits(ids), ids, mask),
            losses.response_logps(model.reference.logits(ids), ids, mask))


@pytest.fixture(scope="module")
def one_device_dpo(dpo_model, pair_batches):
    """The single-device run every layout is compared with, plus its first step's log-probs."""
    engine = _dpo_engine(dpo_model, jax.devices()[:1], 0)
    policy = engine.params["policy"]
    engine.set_params({"policy": policy, "reference": policy})     # one buffer, two names: still steps
    batch = pair_batches[0]
    ids = np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    logps, ref = jax.device_get(_both_logps(engine.model(), ids, mask))
    first = engine.train_step(batch)
    run = _train(engine, pair_batches[1:])
    run["losses"].insert(0, float(first["loss"]))
    return {**run, "logps": logps, "ref": ref, "first_metrics": jax.device_get(first)}


@pytest.mark.slow
def test_dpo_step_is_the_formula_on_policy_and_reference_logps(one_device_dpo):
    logps, ref, metrics = one_device_dpo["logps"], one_device_dpo["ref"], one_device_dpo["first_metrics"]
    np.testing.assert_array_equal(logps, ref)                 # the reference starts as the policy
    h = (logps[:8] - ref[:8]) - (logps[8:] - ref[8:])
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(np.log1p(np.exp(-0.2 * h))), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logps/chosen"]), logps[:8].mean(), rtol=1e-5)


def _assert_reference_bitwise_and_policy_trained(run, name):
    jax.tree.map(np.testing.assert_array_equal, run["params"]["reference"], run["start"]["reference"])
    change = lambda a, b: np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
    assert max(jax.tree.leaves(jax.tree.map(change, run["params"]["policy"], run["start"]["policy"]))) > 1e-4, name


@pytest.mark.slow
def test_dpo_under_zero3_and_tensor_parallel_equals_one_device_and_the_reference_never_moves(
        dpo_model, pair_batches, one_device_dpo):
    base = one_device_dpo
    _assert_reference_bitwise_and_policy_trained(base, "one device")
    for name, engine in [("zero3 x8", _dpo_engine(dpo_model, None, 3)),
                         ("tensor 2, zero1", _dpo_engine(dpo_model, None, 1, {"tensor": 2}))]:
        run = _train(engine, pair_batches)
        np.testing.assert_allclose(run["losses"], base["losses"], rtol=1e-4, atol=1e-5, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name),
                     run["params"]["policy"], base["params"]["policy"])
        jax.tree.map(np.testing.assert_array_equal, run["start"]["reference"], base["start"]["reference"])
        _assert_reference_bitwise_and_policy_trained(run, name)
        if name == "zero3 x8":                                  # optimizer state for the policy only
            assert len(jax.tree.leaves(engine.state.opt_state)) < 2 * len(jax.tree.leaves(run["start"]))
            for subtree in ("policy", "reference"):               # both really sharded over the 8 devices
                assert all(not x.sharding.is_fully_replicated for x in jax.tree.leaves(engine.params[subtree]))


@pytest.mark.slow
def test_dpo_in_bf16_under_zero3_equals_bf16_on_one_device(dpo_model, pair_batches):
    one = _train(_dpo_engine(dpo_model, jax.devices()[:1], 0, bf16=True), pair_batches)
    zero3 = _train(_dpo_engine(dpo_model, None, 3, bf16=True), pair_batches)
    np.testing.assert_allclose(zero3["losses"], one["losses"], rtol=0, atol=1e-3)
    assert one["losses"][-1] < one["losses"][0]                 # bf16 steps do train
    for name, run in [("bf16 one device", one), ("bf16 zero3 x8", zero3)]:
        _assert_reference_bitwise_and_policy_trained(run, name)


@pytest.mark.slow
def test_dpo_on_the_toy_data_prefers_chosen_and_precomputed_reference_agrees_and_resumes(tmp_path):
    config = json.load(open(DPO_CONFIG))
    config["zerojax"]["rlhf"]["data"] = os.path.join(ROOT, "configs", "rlhf", "pairs.jsonl")
    config["zerojax"]["train"].update(steps=6, log_every=1, checkpoint_every=0)
    zerojax.rlhf.dpo(config, out=str(tmp_path / "a"))
    config["zerojax"]["rlhf"]["precompute_ref"] = True
    zerojax.rlhf.dpo(config, steps=2, out=str(tmp_path / "b"))
    # Resumed: the data position, optimizer and precomputed reference log-probs come from the checkpoint.
    assert zerojax.rlhf.dpo(config, steps=3, out=str(tmp_path / "b"))["steps"] == 3
    read = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl") if '"loss"' in line]
    a, b = read("a"), read("b")
    assert a[-1]["rewards/accuracies"] > 0.9 and a[-1]["rewards/margins"] > a[0]["rewards/margins"]
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a[:3], b):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5, abs_tol=1e-6), (x["loss"], y["loss"])

    # The checkpoint is the policy's: it exports (and serves, and is an init_from) as the model.
    from zerojax import checkpoint
    root = str(tmp_path / "a")
    tag = checkpoint.latest_tag(root)
    policy = checkpoint.read_param(root, tag, "policy.embed_tokens", [256, 64], "float32")
    reference = checkpoint.read_param(root, tag, "reference.embed_tokens", [256, 64], "float32")
    assert np.abs(policy - reference).max() > 1e-4
    assert cli.main(["export", root, str(tmp_path / "hf"), "--hf"]) == 0
    from safetensors.numpy import load_file
    np.testing.assert_array_equal(load_file(str(tmp_path / "hf" / "model.safetensors"))["model.embed_tokens.weight"],
                                  policy)


# ---------------------------------------------------------------- reward model
def _assert_hf_scores_equal_ours(hf_dir, architecture: str, model) -> None:
    """The exported classifier's logit is our reward model's score, on right-padded rows of several lengths."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == architecture and hf.config.num_labels == 1
    pairs, _ = rdata.preference_pairs(os.path.join(ROOT, "configs", "rlhf", "pairs.jsonl"), ByteTokenizer(),
                                      max_prompt_len=64, max_len=128)
    ids, lengths = (rdata.pad_sequences([p for p, _, _ in pairs[:4]], [c for _, c, _ in pairs[:4]], 128)[k]
                    for k in ("input_ids", "lengths"))
    assert len(set(lengths.tolist())) > 1                     # the score is read at different positions
    ours = np.asarray(nnx.jit(lambda m, ids, n: m.scores(ids, n))(model, ids, lengths))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
def test_reward_model_learns_the_preference_and_exports_to_hf_sequence_classification(tmp_path):
    from zerojax.rlhf import RewardModel
    from zerojax.trainer import model_fn_from_config

    config = json.load(open(os.path.join(ROOT, "configs", "rlhf", "reward.json")))
    config["zerojax"]["rlhf"]["data"] = os.path.join(ROOT, "configs", "rlhf", "pairs.jsonl")
    config["zerojax"]["train"].update(steps=10, log_every=5, checkpoint_every=0)
    zerojax.rlhf.reward(config, out=str(tmp_path / "rm"))
    records = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl") if '"loss"' in line]
    assert records[-1]["accuracy"] > 0.9 and records[-1]["margin"] > records[0]["margin"], records[-1]

    assert cli.main(["export", str(tmp_path / "rm"), str(tmp_path / "hf"), "--hf"]) == 0
    base_fn, _ = model_fn_from_config(Config.load(config))   # the run's model and config: its init program is reused
    engine = zerojax.initialize(model_fn=lambda rngs: RewardModel(base_fn(rngs), rngs=rngs), config=config)
    engine.load_checkpoint(str(tmp_path / "rm"), load_module_only=True)
    _assert_hf_scores_equal_ours(tmp_path / "hf", "LlamaForSequenceClassification", engine.model())


def test_a_gpt2_reward_model_exports_to_hf_gpt2_for_sequence_classification(tmp_path):
    from zerojax.models import GPT2, GPT2Config
    from zerojax.rlhf import RewardModel

    cfg = GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    rngs = nnx.Rngs(0)
    engine = zerojax.initialize(RewardModel(GPT2(cfg, rngs=rngs), rngs=rngs),        # random init: no training
                                {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
                                devices=jax.devices()[:1])
    engine.save_checkpoint(str(tmp_path / "rm"))
    assert cli.main(["export", str(tmp_path / "rm"), str(tmp_path / "hf"), "--hf"]) == 0
    _assert_hf_scores_equal_ours(tmp_path / "hf", "GPT2ForSequenceClassification", engine.model())
