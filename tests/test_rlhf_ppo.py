"""PPO (DeepSpeed-Chat step 3) end to end on the shipped toy task: the first update's ratio
is exactly 1, the reward rises, the reference never moves, the EMA follows the policy, the
critic checkpoints beside the actor and the run resumes; a reward model scores and seeds
the critic; the critic's step is the same function under ZeRO-3 + TP 2."""
from __future__ import annotations

import io
import json
import os

import jax
import numpy as np
import pytest

import zerojax
from zerojax import checkpoint
from zerojax.models import Llama, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = {"type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
STEPS = 12


def ppo_config(out: str, **rlhf) -> dict:
    return {"train_batch_size": 16, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0}},
            "zerojax": {"model": dict(MODEL), "mesh": {"data": 1},
                        "rlhf": {"data": os.path.join(ROOT, "configs", "rlhf", "prompts.jsonl"),
                                 "reward_fn": os.path.join(ROOT, "examples", "rlhf_rewards.py") + ":digit_share",
                                 "reward_weights": [10.0], "max_prompt_len": 48, "max_new_tokens": 12,
                                 "kl_coef": 0.05, "ema": 0.9, **rlhf},
                        "train": {"steps": STEPS, "log_every": 1, "checkpoint_every": 6, "out": out}}}


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ppo") / "run")
    zerojax.rlhf.ppo(ppo_config(out), stream=io.StringIO())
    return out


def test_first_update_has_ratio_one_and_the_reward_rises(toy_run):
    got = records(toy_run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got[0]["ratio_mean"] == 1.0 and got[0]["clip_fraction"] == 0.0 and got[0]["kl"] == 0.0
    first, last = (np.mean([r["reward_mean"] for r in part]) for part in (got[:3], got[-3:]))
    assert last > 1.5 * first, [round(r["reward_mean"], 3) for r in got]
    assert got[-1]["kl"] > 0 and all(np.isfinite(r["critic_loss"]) for r in got)
    for key in ("reward_std", "response_length", "generation_s", "training_s", "rewards/digit_share", "value_mean"):
        assert key in got[-1], key


def _params(root: str, tag: str, prefix: str) -> np.ndarray:
    return checkpoint.read_param(root, tag, f"{prefix}.embed_tokens", [256, 32], "float32")


def test_reference_is_frozen_ema_follows_and_the_critic_saves_beside_the_actor(toy_run):
    tags = [tag for _, tag in checkpoint.complete_tags(toy_run)]
    assert len(tags) == 2 and checkpoint.latest_tag(toy_run) == tags[-1]
    early, late = tags
    np.testing.assert_array_equal(_params(toy_run, early, "reference"), _params(toy_run, late, "reference"))
    policy, reference, ema = (_params(toy_run, late, p) for p in ("policy", "reference", "ema"))
    assert np.abs(policy - reference).max() > 1e-3
    # The EMA sits between: closer to the policy than the frozen start is.
    assert 0 < np.abs(ema - policy).max() < np.abs(reference - policy).max()
    critic_root = os.path.join(toy_run, "critic")
    assert [t for _, t in checkpoint.complete_tags(critic_root)] == tags       # same tags, saved first
    meta = checkpoint.read_meta(toy_run, late)
    assert meta["client_state"]["step"] == STEPS and meta["model"]["params_under"] == "policy"


def test_a_rerun_resumes_actor_critic_and_data(toy_run):
    stream = io.StringIO()
    summary = zerojax.rlhf.ppo(ppo_config(toy_run), steps=STEPS + 2, stream=stream)
    assert f"resumed from {toy_run} at step {STEPS}" in stream.getvalue()
    assert summary["steps"] == STEPS + 2
    assert [r["step"] for r in records(toy_run)][-2:] == [STEPS + 1, STEPS + 2]


def test_a_reward_model_scores_completions_and_seeds_the_critic(tmp_path):
    from zerojax.rlhf import common, rewards
    from zerojax.rlhf.ppo import PPO
    from zerojax.rlhf.reward import RewardModel

    rm_dir = str(tmp_path / "rm")
    cfg = LlamaConfig(**{k: v for k, v in MODEL.items() if k != "type"})
    engine = zerojax.initialize(model_fn=lambda r: RewardModel(Llama(cfg, rngs=r), rngs=r),
                                config={"train_batch_size": 8, "zerojax": {"seed": 7},
                                        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    engine.save_checkpoint(rm_dir)
    scorer = rewards.RewardModelScorer(rm_dir, engine.mesh, 256)
    seqs = [[5, 6, 7, 8], [9, 10, 11], [12] * 7, [3, 4]]
    ids = np.zeros((4, 8), np.int32)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = s
    want = np.asarray(jax.jit(lambda i, n: engine.model().scores(i, n))(ids, np.array([len(s) for s in seqs])))
    np.testing.assert_allclose(scorer(seqs, 8), want, atol=1e-5)

    config = ppo_config(str(tmp_path / "run"), reward_model=rm_dir, kl_coef=0.0, ema=None)
    del config["zerojax"]["rlhf"]["reward_fn"], config["zerojax"]["rlhf"]["reward_weights"]
    algorithm = PPO(common.prepare(config, "ppo"))
    algorithm.init_weights()
    assert "reference" not in algorithm.actor.state.params          # kl_coef 0: no reference built
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(algorithm.critic.state.params),
                 jax.device_get(engine.state.params))                # the critic starts as the reward model
    # The run's reward: prompt + completion ids scored by the model at their last token.
    from zerojax.rlhf.online import Prompt
    from zerojax.rlhf.rollout import Completion
    prompts = [Prompt(s[:2], "", {}) for s in seqs]
    completions = [Completion(s[:2], s[2:], [0.0] * (len(s) - 2), "", "stop") for s in seqs]
    scores, _ = algorithm.score(prompts, completions)
    np.testing.assert_allclose(scores, want, atol=1e-5)


def _critic_engine(devices, stage: int, mesh: dict | None = None, model=None):
    from zerojax.rlhf.ppo import Critic

    cfg = LlamaConfig(**{k: v for k, v in MODEL.items() if k != "type"})
    config = {"train_batch_size": 8, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zerojax": {"mesh": mesh or {}}}
    if model is not None:       # the same weights in another layout, without another init program
        return zerojax.initialize(model=model, config=config, devices=devices)
    return zerojax.initialize(model_fn=lambda r: Critic(Llama(cfg, rngs=r), rngs=r, clip=0.2, vf_coef=0.1),
                              config=config, devices=devices)


def test_critic_step_under_zero3_and_tensor_parallel_equals_one_device():
    rng = np.random.default_rng(0)
    mask = np.zeros((8, 32), np.float32)
    for row in range(8):
        mask[row, 5 + row:20 + row] = 1
    batches = [{"input_ids": rng.integers(0, 256, (8, 32)).astype(np.int32),
                "old_is_current": np.full(8, 1.0 if i == 0 else 0.0, np.float32),
                "old_values": (rng.standard_normal((8, 32)) * mask).astype(np.float32),
                "returns": (rng.standard_normal((8, 32)) * mask).astype(np.float32),
                "weights": mask * 8 / mask.sum()} for i in range(2)]
    one = _critic_engine(jax.devices()[:1], 0)
    runs = {"one device": one, "zero3 + tensor 2": _critic_engine(None, 3, {"tensor": 2}, model=one.model())}
    assert all(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(runs["zero3 + tensor 2"].params["base"]["layers"]))
    results = {name: ([float(e.train_step(b)["loss"]) for b in batches], jax.device_get(e.params))
               for name, e in runs.items()}
    base_losses, base_params = results["one device"]
    losses, params = results["zero3 + tensor 2"]
    np.testing.assert_allclose(losses, base_losses, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, base_params)


def test_later_updates_use_the_rollouts_log_probs_and_the_first_its_own_forward():
    from flax import nnx
    from zerojax.rlhf import online

    cfg = LlamaConfig(**{k: v for k, v in MODEL.items() if k != "type"})
    actor = online.Actor(Llama(cfg, rngs=nnx.Rngs(0)), objective="ppo", temperature=0.7, clip_low=0.2)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, (4, 16)).astype(np.int32)
    mask = np.zeros((4, 16), np.float32)
    mask[:, 6:15] = 1
    logps = np.asarray(actor.score({"input_ids": ids})["logps"])
    shifted = logps - 0.5 * mask                    # "old" log-probs of a policy that has since moved
    batch = {"input_ids": ids, "old_logps": shifted, "advantages": np.ones_like(mask),
             "weights": mask * 4 / mask.sum()}
    _, first = actor({**batch, "old_is_current": np.ones(4, np.float32)})
    _, later = actor({**batch, "old_is_current": np.zeros(4, np.float32)})
    assert float(first["ratio_mean"]) == 1.0 and float(first["clip_fraction"]) == 0.0
    np.testing.assert_allclose(float(later["ratio_mean"]), np.exp(0.5), rtol=1e-5)
    assert float(later["clip_fraction"]) == 1.0      # e^0.5 > 1.2 with positive advantages: all clipped


def test_the_critic_inherits_the_top_level_optimizer_unless_rlhf_critic_overrides_it():
    from zerojax.config import Config
    from zerojax.rlhf.ppo import critic_config

    config = Config.load(ppo_config("/tmp/unused", critic={"optimizer": {"type": "Adam", "params": {"lr": 1e-5}},
                                                           "zero_optimization": {"stage": 3}}))
    inherited = critic_config(config, {})
    assert inherited.optimizer == config.optimizer and inherited.zero_optimization.stage == 1
    own = critic_config(config, config.zerojax.rlhf["critic"])
    assert own.optimizer.type == "adam" and own.optimizer.params["lr"] == 1e-5
    assert own.zero_optimization.stage == 3 and own.train_batch_size == config.train_batch_size
