"""Online RLHF on a tiny Llama (byte tokenizer, 2 layers): rollouts from the actor's live
params, rewards, the update, checkpoints and resume, end to end on the shipped toy prompts.

One section per algorithm. The shared fixtures are a tiny config (`tiny_config`, one
device unless a test asks for a layout) and its JSON file for the CLI; every run of the
file uses the same model, batch and lengths, so the in-process engines and the CLI
subprocesses compile the same programs once (the session's compilation cache).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

import zerojax
import zerojax.engine
from zerojax import checkpoint
from zerojax.config import ConfigError
from zerojax.rlhf import common, losses, online, rewards, rollout as rollout_lib
from zerojax.rlhf import data as rdata

grpo_lib = importlib.import_module("zerojax.rlhf.grpo")     # zerojax.rlhf.grpo is also the function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = os.path.join(ROOT, "configs", "rlhf", "prompts.jsonl")
REWARDS = os.path.join(ROOT, "examples", "rlhf_rewards.py")

ROWS = 16                   # completions per step (GRPO) / rollouts per step (PPO)
MAX_PROMPT, MAX_NEW = 48, 12   # the toy prompts are 40-47 bytes; 48 + 12 <= max_position_embeddings 64
TEMPERATURE = 0.7


def tiny_config(algorithm: str = "grpo", **rlhf) -> dict:
    """A fresh config of the tiny model on one device (mesh data 1) for `algorithm`."""
    online_section = {"data": PROMPTS, "reward_fn": f"{REWARDS}:digit_share", "max_prompt_len": MAX_PROMPT,
                      "max_new_tokens": MAX_NEW, "temperature": TEMPERATURE}
    if algorithm == "grpo":
        online_section.update(num_generations=4, beta=0.04, loss_type="dapo")
    online_section.update(rlhf)
    return {
        "train_batch_size": ROWS,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "betas": [0.9, 0.95], "weight_decay": 0.0}},
        "gradient_clipping": 1.0,
        "steps_per_print": 1,
        "zero_optimization": {"stage": 0},
        "zerojax": {
            "mesh": {"data": 1},
            "model": {"type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "max_position_embeddings": 64},
            "rlhf": online_section,
            "train": {"steps": 6, "log_every": 1, "checkpoint_every": 0},
        },
    }


def write_config(path, config: dict) -> str:
    with open(path, "w") as f:
        json.dump(config, f)
    return str(path)


def read_metrics(out) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    return [json.loads(line) for line in lines if line.endswith("\n") and '"step"' in line]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "zerojax.cli", *args]


def response_positions(batch) -> np.ndarray:
    """[B, L] bool: position t predicts a generated token (completion_mask at t + 1)."""
    mask = batch["completion_mask"]
    return np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1).astype(bool)


# =============================================================== rollout batches
def test_a_completion_batch_counts_generated_tokens_up_to_eos_and_nothing_after():
    eos = 1
    done = [rollout_lib.Completion([10, 11, 12], [20, 21, eos], [-0.5, -0.25, -0.125], "ab", "stop"),
            rollout_lib.Completion([13], [22, 23, 24, 25], [-1.0, -2.0, -3.0, -4.0], "cdef", "length")]
    length = rollout_lib.padded_length(done, 8)               # 6 tokens round to 32, capped at the limit
    batch = rollout_lib.completion_batch(done, length, pad_id=0)
    assert length == 8 and batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, eos, 0, 0],
                                                          [13, 22, 23, 24, 25, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    # Each generated token's rollout log-prob sits where the trainer predicts it (HF shift).
    counted = np.asarray(losses.predicts_response(batch["completion_mask"]))
    assert counted.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    np.testing.assert_array_equal(batch["rollout_logps"][counted > 0], [-0.5, -0.25, -0.125, -1, -2, -3, -4])
    assert not batch["rollout_logps"][counted == 0].any()


# =============================================================== GRPO
GRPO_STEPS = 12
DIGIT_SHARE = rewards.load_function(f"{REWARDS}:digit_share")


@pytest.fixture(scope="module")
def grpo_config_file(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("grpo") / "grpo.json", tiny_config("grpo"))


@pytest.fixture(scope="module")
def grpo_run():
    """GRPO (beta 0.04, so with a reference) trained GRPO_STEPS steps on one device, recording
    the first two train batches with the loss and policy after each, the reward function's
    inputs, and the params before training."""
    run = common.prepare(tiny_config("grpo"), "grpo")
    prompts, _ = online.read_prompts(run.settings["data"], run.tokenizer, max_prompt_len=MAX_PROMPT)
    calls = []

    def digit_share(prompts, completions, **columns):          # the config's reward, inputs recorded
        calls.append({"prompts": prompts, "completions": completions, **columns})
        return DIGIT_SHARE(prompts, completions, **columns)

    algorithm = grpo_lib.GRPO(run, reward_fn=digit_share)
    actor = algorithm.actor
    start = jax.device_get(actor.params)
    recorded, train_step = [], actor.train_step

    def recording_train_step(batch):
        metrics = train_step(batch)
        if len(recorded) < 2:
            recorded.append({"batch": {k: np.array(v) for k, v in batch.items()}, "loss": float(metrics["loss"]),
                             "policy": jax.device_get(actor.params["policy"])})
        return metrics

    actor.train_step = recording_train_step
    batches = rdata.ExampleBatches(prompts, ROWS // 4, list, seed=run.config.zerojax.seed, process_index=0,
                                   process_count=1)
    metrics = [algorithm.step(i, batches.next()) for i in range(GRPO_STEPS)]
    print("\nGRPO reward_mean per step:", " ".join(f"{m['reward_mean']:.3f}" for m in metrics))
    print("GRPO kl per step:", " ".join(f"{m['kl']:.2e}" for m in metrics))
    return SimpleNamespace(run=run, algorithm=algorithm, prompts=prompts, start=start, metrics=metrics,
                           recorded=recorded, reward_calls=calls)


def test_grpo_first_update_has_ratio_exactly_one_and_nothing_clipped(grpo_run):
    first = grpo_run.metrics[0]
    assert first["ratio_mean"] == 1.0 and first["clip_fraction"] == 0.0, first
    assert first["clip_ratio/low_mean"] == 0.0 and first["clip_ratio/high_mean"] == 0.0
    assert first["grad_norm"] > 0                               # the update is not a no-op


def _rollout_vs_trainer_gap(algorithm, prompts, step: int, one_at_a_time: bool = False) -> tuple[float, int]:
    """max |rollout log-prob - trainer's recomputation| over generated tokens."""
    rollout = algorithm.rollout
    rollout.sync()
    if one_at_a_time:       # a prefill and a one-row decode: two compiled buckets, not all of them
        completions = [c for p in prompts for c in rollout.generate([p.ids], step)]
    else:
        completions = rollout.generate([p.ids for p in prompts], step)
    batch = rollout_lib.completion_batch(completions, MAX_PROMPT + MAX_NEW, algorithm.run.pad_id)
    scored = jax.device_get(online.forward(algorithm.actor, "score")(
        {"input_ids": batch["input_ids"]}))["logps"]
    where = response_positions(batch)
    assert where.sum() == sum(len(c.token_ids) for c in completions) > 0
    assert all(len(c.logprobs) == len(c.token_ids) for c in completions)
    gap = np.abs(np.asarray(scored)[where] - batch["rollout_logps"][where])
    assert np.isfinite(gap).all()
    return float(gap.max()), int(where.sum())


def test_grpo_rollout_logps_equal_the_trainers_in_fp32(grpo_run):
    algorithm = grpo_run.algorithm
    assert algorithm.rollout.sampling.temperature == algorithm.actor.model().temperature == TEMPERATURE
    group = [p for p in grpo_run.prompts[:4] for _ in range(4)]
    gap, tokens = _rollout_vs_trainer_gap(algorithm, group, step=10_000)   # trained params, fresh seeds
    print(f"\nfp32 rollout vs trainer log-prob gap: {gap:.2e} (max abs over {tokens} tokens, T={TEMPERATURE})")
    assert gap <= 1e-5


@pytest.fixture(scope="module")
def grpo_bf16():
    """GRPO with bf16 compute; its rollout compiles only the buckets it uses (no warmup)."""
    config = tiny_config("grpo")
    config["bf16"] = {"enabled": True}
    run = common.prepare(config, "grpo")
    with pytest.MonkeyPatch.context() as patch:
        real = rollout_lib.InferenceEngine
        patch.setattr(rollout_lib, "InferenceEngine", lambda *a, **k: real(*a, **{**k, "warmup": False}))
        return grpo_lib.GRPO(run)


def test_grpo_bf16_rollout_logps_gap_is_small(grpo_run, grpo_bf16):
    algorithm = grpo_bf16
    assert algorithm.rollout.inference.dtype == np.dtype("bfloat16")
    gap, tokens = _rollout_vs_trainer_gap(algorithm, grpo_run.prompts[:4], step=0, one_at_a_time=True)
    print(f"\nbf16 rollout vs trainer log-prob gap: {gap:.3e} (max abs over {tokens} tokens, T={TEMPERATURE})")
    assert gap < 0.5


def _actor_grpo_builds(**rlhf) -> online.Actor:
    """The (abstract) actor module grpo.GRPO builds for these settings, without building it."""
    run = common.prepare(tiny_config("grpo", **rlhf), "grpo")

    class Built(Exception):
        pass

    def capture(*, model_fn, config):
        raise Built(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Built) as built:
        patch.setattr(zerojax.engine, "initialize", capture)
        grpo_lib.GRPO(run)
    return built.value.args[0]


def test_grpo_reward_rises_on_the_toy_task(grpo_run):
    rewards_ = [m["reward_mean"] for m in grpo_run.metrics]
    first, last = np.mean(rewards_[:2]), np.mean(rewards_[-3:])
    assert last > 3 * first and last > first + 0.15, rewards_


def test_grpo_reference_is_frozen_and_kl_starts_at_zero(grpo_run):
    params = jax.device_get(grpo_run.algorithm.actor.params)
    assert set(params) == {"policy", "reference"}
    kls = [m["kl"] for m in grpo_run.metrics]
    assert kls[0] < 1e-6 and all(k >= 0 for k in kls) and kls[-1] > 1e-5, kls
    jax.tree.map(np.testing.assert_array_equal, params["reference"], grpo_run.start["reference"])   # bitwise
    jax.tree.map(np.testing.assert_array_equal, grpo_run.start["reference"], grpo_run.start["policy"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), params["policy"],
                                         grpo_run.start["policy"]))
    assert max(moved) > 1e-3
    # beta 0: no reference is built
    without = _actor_grpo_builds(beta=0.0)
    assert without.reference is None and without.zerojax_frozen == ()
    assert set(nnx.to_pure_dict(nnx.state(without, nnx.Param))) == {"policy"}
    with_reference = _actor_grpo_builds(beta=0.1)
    assert with_reference.zerojax_frozen == ("reference",) and with_reference.beta == 0.1


def _actor_engine_from_start(grpo_run, config: dict):
    """The GRPO actor (as grpo.GRPO builds it) with the shared run's start params, laid out by
    `config`: placed from one host-built module, so no init program per layout."""
    s, policy_fn = grpo_run.run.settings, grpo_run.run.model_fn

    def model_fn(rngs):
        policy = policy_fn(rngs)
        return online.Actor(policy, reference=nnx.clone(policy), objective="grpo", temperature=s["temperature"],
                            clip_low=s["epsilon"], clip_high=s["epsilon_high"], beta=s["beta"])

    graphdef, params = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))), nnx.Param)
    nnx.replace_by_pure_dict(params, grpo_run.start)
    return zerojax.initialize(nnx.merge(graphdef, params), config=common.prepare(config, "grpo").config)


def test_grpo_under_zero3_and_tensor_parallel_takes_the_same_first_steps_as_one_device(grpo_run):
    """The single-device run's first train batches, replayed from the same start params
    under ZeRO-3 with TP 2 on 8 devices (data 4 x tensor 2)."""
    config = tiny_config("grpo")
    # threshold 0: ZeRO-3 shards even this tiny model's params (DeepSpeed keeps params under
    # stage3_param_persistence_threshold, 1e5 elements by default, whole on every rank)
    config["zero_optimization"].update(stage=3, stage3_param_persistence_threshold=0)
    config["zerojax"]["mesh"] = {"tensor": 2}
    layout = "zero3 + tensor 2"
    engine = _actor_engine_from_start(grpo_run, config)
    assert engine.mesh.devices.size == 8 and engine.mesh.shape["tensor"] == 2 and engine.mesh.shape["data"] == 4
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(engine.params["policy"])]
    assert all("data" in spec for spec in specs) and sum("tensor" in spec for spec in specs) >= 8, specs
    for step, want in enumerate(grpo_run.recorded):
        loss = float(engine.train_step(want["batch"])["loss"])
        assert abs(loss - want["loss"]) <= 1e-4, (layout, step, loss, want["loss"])
        got = jax.device_get(engine.params["policy"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"{layout} step {step}"),
                     got, want["policy"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), got, grpo_run.start["policy"]))
    assert max(moved) > 1e-3                                   # the steps did change the policy
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(engine.params["reference"]),
                 grpo_run.start["reference"])


def test_grpo_loss_normalisation_is_the_same_under_gradient_accumulation(grpo_run):
    """The recorded batches (dapo weights over the whole batch) through 2 micro-batches of 8:
    the mean of the micro-batch losses is the whole batch's loss, and the update the same."""
    config = tiny_config("grpo")
    config.update(train_micro_batch_size_per_gpu=ROWS // 2, gradient_accumulation_steps=2)
    engine = _actor_engine_from_start(grpo_run, config)
    assert engine.batch_sizes.gradient_accumulation_steps == 2
    for step, want in enumerate(grpo_run.recorded):
        loss = float(engine.train_step(want["batch"])["loss"])
        assert abs(loss - want["loss"]) <= 2e-5, (step, loss, want["loss"])
        # Accumulation sums the micro-batches' gradients: DESIGN's bound for a reduction in
        # another order, 1e-4 relative norm. Adam's first steps (lr 2e-2) scale each element's
        # update by its own gradient's size, so an element whose gradient nearly cancels
        # carries its last-bit rounding into the update at full lr: 2.3e-5 measured on
        # down_proj, the other leaves <= 2.5e-6.
        jax.tree.map(lambda a, b: _assert_relative_norm(a, b, 1e-4, f"gas 2 step {step}"),
                     jax.device_get(engine.params["policy"]), want["policy"])


def _assert_relative_norm(got, want, bound: float, what: str) -> None:
    error = np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30)
    assert error <= bound, (what, error)


# ---- rewards
def _wrong_length(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)


def _nan_reward(prompts, completions, **columns):
    return [0.5] * (len(completions) - 1) + [math.nan]


def _exploding_reward(prompts, completions, **columns):
    raise RuntimeError("boom")


def _not_numbers(prompts, completions, **columns):
    return ["high"] * len(completions)


@pytest.mark.parametrize("fn, needle", [
    (_exploding_reward, "reward function _exploding_reward raised RuntimeError: boom"),
    (_wrong_length, "reward function _wrong_length returned 2 values for 3 completions"),
    (_nan_reward, "reward function _nan_reward returned nan for completion 2"),
    (_not_numbers, "reward function _not_numbers must return a list of numbers"),
])
def test_a_bad_reward_function_is_an_error_naming_it(fn, needle):
    functions = rewards.RewardFunctions([DIGIT_SHARE, fn], [1.0, 0.5])
    with pytest.raises(rewards.RewardError, match=needle):
        functions(["p"] * 3, ["1a", "22", "x"], {})
    total, means = rewards.RewardFunctions([DIGIT_SHARE])(["p"] * 3, ["1a", "22", "x"], {})
    np.testing.assert_allclose(total, [0.5, 1.0, 0.0])
    assert means == {"rewards/digit_share": 0.5}


def test_reward_functions_receive_the_datas_columns_in_order(grpo_run):
    """length_match gets each completion's own target_len; in the loop, each prompt's
    column is repeated over its group, in the data's (shuffled) order."""
    length_match = rewards.load_function(f"{REWARDS}:length_match")
    score = rewards.build({"reward_weights": [2.0]}, mesh=None, vocab_size=256, reward_fn=length_match)
    group = [online.Prompt([1], "a", {"target_len": 4}), online.Prompt([1], "b", {"target_len": 8})]
    completions = [SimpleNamespace(text=t) for t in ("abcd", "abcd")]
    total, means = score(group, completions)
    np.testing.assert_allclose(total, [2.0, 1.0])             # 2 * [exact, half-way off]
    assert means == {"rewards/length_match": 0.75}

    replay = rdata.ExampleBatches(grpo_run.prompts, ROWS // 4, list, seed=grpo_run.run.config.zerojax.seed,
                                  process_index=0, process_count=1)
    assert len(grpo_run.reward_calls) == GRPO_STEPS
    for call in grpo_run.reward_calls:
        group = [p for p in replay.next() for _ in range(4)]
        assert call["prompts"] == [p.text for p in group]
        assert call["target_len"] == [p.columns["target_len"] for p in group]
        assert all(not text.startswith("User:") for text in call["completions"])   # the prompt excluded
    assert len({tuple(c["target_len"]) for c in grpo_run.reward_calls}) > 1


def test_grpo_cli_with_a_raising_reward_exits_2_naming_it(grpo_config_file, tmp_path, capsys):
    """`zerojax rlhf grpo CONFIG --set zerojax.rlhf.reward_fn=FILE:NAME` (the CLI's main, in
    this process: the compiled programs are this module's)."""
    from zerojax import cli as zerojax_cli

    bad = tmp_path / "bad_rewards.py"
    bad.write_text("def exploding_reward(prompts, completions, **columns):\n"
                   "    raise RuntimeError('boom')\n")
    out = tmp_path / "out"
    code = zerojax_cli.main(["rlhf", "grpo", grpo_config_file, "--out", str(out), "--steps", "2", "--set",
                             f"zerojax.rlhf.reward_fn={bad}:exploding_reward"])
    err = capsys.readouterr().err
    assert code == 2, err[-4000:]
    assert "zerojax rlhf: error: reward function exploding_reward raised RuntimeError: boom" in err, err
    assert not os.path.exists(out / "latest") and not checkpoint.complete_tags(str(out))


# ---- kill -9 and resume
def test_grpo_killed_mid_run_resumes_from_its_checkpoint(grpo_config_file, tmp_path, capsys):
    """`zerojax rlhf grpo` killed with SIGKILL after step 3, then the same command again (the
    CLI's main in this process, to spare a second start-up)."""
    from zerojax import cli as zerojax_cli

    out = str(tmp_path / "run")
    args = ["rlhf", "grpo", grpo_config_file, "--out", out, "--steps", "6",
            "--set", "zerojax.train.checkpoint_every=2", "--set", "zerojax.train.log_every=1"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cli(*args), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not any(r["step"] >= 3 for r in read_metrics(out)):
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step 3: " \
                                        f"{(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no step 3 within 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    killed_lines = len(open(os.path.join(out, "metrics.jsonl")).readlines())
    killed = {r["step"]: r for r in read_metrics(out)}
    assert killed[1]["ratio_mean"] == 1.0 and killed[1]["clip_fraction"] == 0.0   # first update, from the file
    assert killed[1]["kl"] < 1e-6

    tag = checkpoint.latest_tag(out)
    assert tag is not None and tag in [t for _, t in checkpoint.complete_tags(out)]
    meta = checkpoint.read_meta(out, tag)
    saved = meta["client_state"]["step"]
    assert saved in (2, 4) and meta["global_steps"] == saved and saved <= max(killed)
    replay = rdata.ExampleBatches(list(range(64)), ROWS // 4, list, seed=0, process_index=0, process_count=1)
    for _ in range(saved):
        replay.next()
    assert meta["client_state"]["data"] == replay.state()     # the data position after `saved` steps

    code = zerojax_cli.main(args)
    printed = capsys.readouterr()
    assert code == 0, printed.err[-4000:]
    assert f"resumed from {out} at step {saved}" in printed.out + printed.err
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f.readlines()[killed_lines:]]
    assert [r["step"] for r in records] == list(range(saved + 1, 7))
    # Steps the killed run had finished past its checkpoint are redone identically: same
    # prompts (data position), same sampling seeds, same params and optimizer state.
    again = [r for r in records if r["step"] in killed]
    assert again or max(killed) == saved
    print(f"\nkilled after step {max(killed)}, resumed from step {saved}; steps redone: {[r['step'] for r in again]}")
    for r in again:
        assert r["reward_mean"] == killed[r["step"]]["reward_mean"], (r, killed[r["step"]])
        assert r["loss"] == pytest.approx(killed[r["step"]]["loss"], abs=1e-6)
    final = checkpoint.read_meta(out, checkpoint.latest_tag(out))
    assert final["client_state"]["step"] == 6 and final["global_steps"] == 6


# ---- config errors
@pytest.mark.parametrize("change, needle", [
    ({"train_batch_size": 18}, r"train_batch_size 18 .* multiple of zerojax.rlhf.num_generations 4"),
    ({"rlhf": {"kl_coef": 0.1}}, r"zerojax.rlhf.kl_coef does not apply to grpo \(it is a ppo setting\)"),
    ({"rlhf": {"max_new_tokens": 24}}, r"max_prompt_len \+ max_new_tokens = 72 exceeds the model's "
                                       r"max_position_embeddings 64"),
])
def test_grpo_config_errors_name_the_keys(change, needle):
    config = tiny_config("grpo", **change.get("rlhf", {}))
    config.update({k: v for k, v in change.items() if k != "rlhf"})
    with pytest.raises(ConfigError, match=needle):
        zerojax.rlhf.grpo(config, steps=1, out="/nonexistent/never-written")
