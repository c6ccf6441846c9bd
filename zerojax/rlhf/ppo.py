"""PPO (DeepSpeed-Chat step 3): actor, critic, frozen reference, rewards.

Each step samples one completion per prompt for `train_batch_size * mini_batches`
prompts from the actor's live params, scores them (`reward_fn` or a reward model,
clipped to ±`reward_clip`), and runs a score pass: the actor's and the reference's
log-probs and the critic's values, each one compiled forward on its engine. The reward of
a token is `-kl_coef * KL` (estimator `k1` | `k3`), plus the clipped score on the last
generated token (DeepSpeed-Chat's `compute_rewards`); optionally whitened. GAE (`gamma`,
`lam`) gives advantages (whitened over the rollout, as TRL does: the step size is then
independent of the reward's scale) and returns. Then `ppo_epochs` passes over `mini_batches`
mini-batches of `train_batch_size` rollouts: an actor step with the clipped ratio
(`cliprange`) and a critic step with the clipped value loss (`cliprange_value`, scaled
by `vf_coef`), both token means over the mini-batch. Actor and critic are two engines,
each with its own optimizer and ZeRO state; the critic takes the top-level optimizer,
scheduler and zero_optimization unless `rlhf.critic` overrides them, and starts from the
reward model (DeepSpeed-Chat's choice) or, without one, from the actor's weights plus a
fresh value head (`critic.init_from` may name either explicitly). The first update of a
rollout uses its own forward as the old log-probs and values (ratio exactly 1); later
ones the score pass's. With `ema` the actor keeps an EMA copy of its policy
(DeepSpeed-Chat's `--enable_ema`), saved in its checkpoints under `ema`.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zerojax.config import Config
from zerojax.rlhf import common, data as rdata, losses, online, rewards as rewards_lib
from zerojax.rlhf.reward import RewardModel
from zerojax.rlhf.rollout import Rollout, completion_batch, padded_length


class Critic(RewardModel):
    """A reward model's shape (base + score head) read at every position: V(prefix up to t)."""

    def __init__(self, base: nnx.Module, *, rngs: nnx.Rngs, clip: float = 0.2, vf_coef: float = 0.1):
        super().__init__(base, rngs=rngs)
        self.clip, self.vf_coef = clip, vf_coef

    def score_values(self, batch) -> jax.Array:
        return self.values(jnp.asarray(batch["input_ids"]))

    def __call__(self, batch) -> tuple[jax.Array, dict]:
        values = self.values(jnp.asarray(batch["input_ids"]))
        current = jax.lax.stop_gradient(values)
        old = jnp.where(batch["old_is_current"][:, None] > 0, current, batch["old_values"])
        loss, metrics = losses.value_loss(values, old, batch["returns"], batch["weights"], clip=self.clip)
        return self.vf_coef * loss, {**metrics, "value_loss": loss}


def critic_config(config: Config, overrides: dict) -> Config:
    """The top-level config with `rlhf.critic`'s optimizer / scheduler / zero_optimization."""
    dotted = {key: overrides[key] for key in ("optimizer", "scheduler", "zero_optimization") if key in overrides}
    return config.with_overrides(dotted) if dotted else config


class PPO:
    def __init__(self, run: common.Run, reward_fn=None):
        from zerojax.engine import initialize

        s, self.run, self.settings = run.settings, run, run.settings
        policy_fn = run.model_fn

        def actor_fn(rngs):
            policy = policy_fn(rngs)
            return online.Actor(policy, reference=nnx.clone(policy) if s["kl_coef"] > 0 else None,
                                ema=nnx.clone(policy) if s["ema"] else None, objective="ppo",
                                temperature=s["temperature"], clip_low=s["cliprange"])

        def critic_fn(rngs):
            return Critic(policy_fn(rngs), rngs=rngs, clip=s["cliprange_value"], vf_coef=s["vf_coef"])

        self.actor = initialize(model_fn=actor_fn, config=run.config)
        self.critic = initialize(model_fn=critic_fn, config=critic_config(run.config, s["critic"]))
        self.engines = {"actor": self.actor, "critic": self.critic}
        self.score = rewards_lib.build(s, mesh=self.actor.mesh, vocab_size=run.vocab_size, pad_id=run.pad_id,
                                       reward_fn=reward_fn)
        self.rollout = Rollout.for_run(self.actor, run, run.global_rows * s["mini_batches"])
        self.update_ema = online.ema_updater(self.actor, s["ema"]) if s["ema"] else None
        self.actor_scores = online.forward(self.actor, "score")
        self.critic_values = online.forward(self.critic, "score_values")

    def init_weights(self) -> None:
        from zerojax.trainer import load_model_params

        s, init_from = self.settings, self.run.model_section.get("init_from")
        params = dict(self.actor.state.params)
        if init_from:
            params["policy"] = load_model_params(self.actor, init_from, "policy")
        for frozen in ("reference", "ema"):
            if frozen in params:
                params[frozen] = params["policy"]
        self.actor.set_params(params)
        critic_from = s["critic"].get("init_from") or s["reward_model"]
        if critic_from and critic_from != "actor" and _is_reward_run(critic_from):
            self.critic.load_checkpoint(critic_from, load_module_only=True)
        elif critic_from and critic_from != "actor":
            self.critic.set_params({**self.critic.state.params,
                                    "base": load_model_params(self.critic, critic_from, "base")})
        elif init_from:
            self.critic.set_params({**self.critic.state.params,
                                    "base": load_model_params(self.critic, init_from, "base")})
        else:       # the actor's random init: the critic's base starts as the policy
            self.critic.set_params({**self.critic.state.params, "base": params["policy"]})

    def advantages(self, batch: dict, scores: np.ndarray) -> dict[str, np.ndarray]:
        """Per-token rewards (KL penalty + the clipped score at the last token), GAE."""
        s = self.settings
        counted = np.asarray(losses.predicts_response(batch["completion_mask"]))
        scored = jax.device_get(self.actor_scores(batch))
        values = np.asarray(jax.device_get(self.critic_values(batch))) * counted
        logps = np.asarray(scored["logps"])
        kl = (np.asarray(losses.kl_per_token(logps, scored["ref_logps"], s["kl_estimator"])) * counted
              if "ref_logps" in scored else np.zeros_like(counted))
        rewards = -s["kl_coef"] * kl
        last = counted.shape[1] - 1 - np.argmax(counted[:, ::-1], axis=1)
        rewards[np.arange(len(scores)), last] += scores
        if s["whiten_rewards"]:
            rewards = np.asarray(losses.masked_whiten(rewards, counted, shift_mean=False))
        adv, returns = losses.gae(rewards, values, counted, gamma=s["gamma"], lam=s["lam"])
        adv = losses.masked_whiten(adv, counted)          # as TRL: one scale whatever the reward's
        return {"counted": counted, "old_logps": logps * counted, "old_values": values,
                "advantages": np.asarray(adv, np.float32), "returns": np.asarray(returns, np.float32),
                "kl": float((kl.sum(axis=1)).mean())}

    def step(self, index: int, prompts: list[online.Prompt]) -> dict[str, float]:
        s = self.settings
        t0 = time.perf_counter()
        self.rollout.sync()
        completions = self.rollout.generate([p.ids for p in prompts], index)
        generation_s = time.perf_counter() - t0
        raw, reward_metrics = self.score(prompts, completions)
        scores = np.clip(raw, -s["reward_clip"], s["reward_clip"]).astype(np.float32)
        batch = completion_batch(completions, padded_length(completions, s["max_prompt_len"] + s["max_new_tokens"]),
                                 self.run.pad_id)
        t1 = time.perf_counter()
        rollout = self.advantages(batch, scores)
        actor_metrics, critic_metrics = self.update(batch["input_ids"], rollout, index)
        training_s = time.perf_counter() - t1
        lengths = np.array([len(c.token_ids) for c in completions])
        mean = lambda ms, key: float(np.mean([float(m[key]) for m in ms]))
        out = {"loss": mean(actor_metrics, "loss"), "lr": float(actor_metrics[-1]["lr"]),
               "grad_norm": mean(actor_metrics, "grad_norm"), "clip_fraction": mean(actor_metrics, "clip_fraction"),
               "approx_kl": mean(actor_metrics, "approx_kl"), "ratio_mean": mean(actor_metrics, "ratio_mean"),
               "critic_loss": mean(critic_metrics, "value_loss"),
               "vf_clip_fraction": mean(critic_metrics, "vf_clip_fraction"),
               "value_mean": mean(critic_metrics, "value_mean"), "kl": rollout["kl"],
               "score_mean": float(scores.mean()), **reward_metrics, "reward_mean": float(raw.mean()),
               "reward_std": float(raw.std()), "response_length": float(lengths.mean()),
               "completions/clipped_ratio": float(np.mean([c.finish_reason == "length" for c in completions])),
               "generation_s": generation_s, "training_s": training_s,
               "tokens_per_s": float(batch["input_ids"].size) / (time.perf_counter() - t0)}
        return out

    def update(self, input_ids: np.ndarray, rollout: dict, index: int) -> tuple[list, list]:
        """`ppo_epochs` passes over `mini_batches` shuffled mini-batches: actor then critic."""
        s, rows = self.settings, self.run.global_rows
        actor_metrics, critic_metrics = [], []
        for epoch in range(s["ppo_epochs"]):
            order = (np.random.default_rng([self.run.config.zerojax.seed, index, epoch]).permutation(len(input_ids))
                     if s["mini_batches"] > 1 else np.arange(len(input_ids)))
            for m in range(s["mini_batches"]):
                take = order[m * rows:(m + 1) * rows]
                first = np.full(rows, 1.0 if epoch == 0 and m == 0 else 0.0, np.float32)
                weights = np.asarray(losses.token_weights(rollout["counted"][take], "token_mean"), np.float32)
                common_rows = {"input_ids": input_ids[take], "old_is_current": first, "weights": weights}
                actor_metrics.append(jax.device_get(self.actor.train_step(
                    {**common_rows, "old_logps": rollout["old_logps"][take],
                     "advantages": rollout["advantages"][take]})))
                critic_metrics.append(jax.device_get(self.critic.train_step(
                    {**common_rows, "old_values": rollout["old_values"][take], "returns": rollout["returns"][take]})))
                if self.update_ema is not None:
                    self.update_ema()
        return actor_metrics, critic_metrics


def _is_reward_run(path: str) -> bool:
    from zerojax import checkpoint

    tag = checkpoint.latest_tag(path)
    return bool(tag) and bool((checkpoint.read_meta(path, tag).get("model") or {}).get("reward_head"))


def ppo(config: Any, *, steps: int | None = None, out: str | None = None, stream=None,
        reward_fn: Callable | list[Callable] | None = None) -> dict:
    """PPO on `zerojax.rlhf.data` (prompts) with `reward_fn` (a callable, or the config's) or `reward_model`."""
    online.check_single_process()
    run = common.prepare(config, "ppo")
    s = run.settings
    prompts, report = online.read_prompts(s["data"], run.tokenizer, max_prompt_len=s["max_prompt_len"],
                                          chat_render=run.chat_render)
    common.check_vocab([(p.ids,) for p in prompts], run.vocab_size, s["data"])
    algorithm = PPO(run, reward_fn)
    batches = rdata.ExampleBatches(prompts, run.global_rows * s["mini_batches"], list,
                                   seed=run.config.zerojax.seed, process_index=0, process_count=1)
    return online.run_loop(run, algorithm, batches, report, steps=steps, out=out, stream=stream)
