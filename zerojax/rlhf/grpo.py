"""GRPO (DeepSeekMath; TRL's GRPOTrainer): no critic, advantages relative to a group.

Each step takes `train_batch_size / num_generations` prompts, samples `num_generations`
completions of each from the actor's live params (`rollout`), scores them, normalises
each reward within its prompt's group (`scale_rewards` "group" | "batch" | "none"), and
runs one compiled train step of the clipped-ratio loss (`epsilon`, `epsilon_high`) with
`beta * k3` to a frozen reference (`beta` 0: no reference is built). `loss_type` sets
the normalisation through per-token weights computed once over the global batch: "grpo"
(each sequence's mean), "dr_grpo" (a constant `max_new_tokens` per sequence), "dapo"
(the batch's tokens) — so gradient accumulation never changes it. One update per rollout,
so the ratio's old log-probs are the step's own forward (exactly 1 on the first update).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from zerojax.config import ConfigError
from zerojax.rlhf import common, data as rdata, losses, online, rewards as rewards_lib
from zerojax.rlhf.rollout import Rollout, completion_batch, padded_length


class GRPO:
    def __init__(self, run: common.Run, reward_fn=None):
        from zerojax.engine import initialize

        s, self.run, self.settings = run.settings, run, run.settings
        policy_fn = run.model_fn

        def model_fn(rngs):
            policy = policy_fn(rngs)
            return online.Actor(policy, reference=nnx.clone(policy) if s["beta"] > 0 else None, objective="grpo",
                                temperature=s["temperature"], clip_low=s["epsilon"], clip_high=s["epsilon_high"],
                                beta=s["beta"])

        self.actor = initialize(model_fn=model_fn, config=run.config)
        self.engines = {"actor": self.actor}
        self.score = rewards_lib.build(s, mesh=self.actor.mesh, vocab_size=run.vocab_size, pad_id=run.pad_id,
                                       reward_fn=reward_fn)
        self.rollout = Rollout.for_run(self.actor, run, run.global_rows)

    def init_weights(self) -> None:
        from zerojax.trainer import load_model_params

        init_from = self.run.model_section.get("init_from")
        if init_from:
            params = dict(self.actor.state.params)
            params["policy"] = load_model_params(self.actor, init_from, "policy")
            if "reference" in params:
                params["reference"] = params["policy"]
            self.actor.set_params(params)

    def step(self, index: int, prompts: list[online.Prompt]) -> dict[str, float]:
        s, G = self.settings, self.settings["num_generations"]
        t0 = time.perf_counter()
        self.rollout.sync()
        group = [p for p in prompts for _ in range(G)]
        completions = self.rollout.generate([p.ids for p in group], index)
        generation_s = time.perf_counter() - t0
        raw, reward_metrics = self.score(group, completions)
        advantages = np.asarray(losses.group_advantages(raw.astype(np.float32), G, scale=s["scale_rewards"]))
        batch = completion_batch(completions, padded_length(completions, s["max_prompt_len"] + s["max_new_tokens"]),
                                 self.run.pad_id)
        counted = np.asarray(losses.predicts_response(batch["completion_mask"]))
        weights = np.asarray(losses.token_weights(counted, s["loss_type"], max_completion_len=s["max_new_tokens"]),
                             np.float32)
        t1 = time.perf_counter()
        metrics = self.actor.train_step({"input_ids": batch["input_ids"], "advantages": advantages,
                                         "weights": weights})
        metrics = jax.device_get(metrics)
        training_s = time.perf_counter() - t1
        lengths = np.array([len(c.token_ids) for c in completions])
        out = {k: float(v) for k, v in metrics.items() if k in ("loss", "lr", "grad_norm", "clip_fraction",
                                                                "clip_ratio/low_mean", "clip_ratio/high_mean",
                                                                "ratio_mean")}
        if s["beta"] > 0:
            out["kl"] = float(metrics["kl"])
        out.update(reward_metrics)
        out.update(reward_mean=float(raw.mean()), reward_std=float(raw.std()), response_length=float(lengths.mean()),
                   **{"completions/clipped_ratio": float(np.mean([c.finish_reason == "length" for c in completions]))},
                   generation_s=generation_s, training_s=training_s,
                   tokens_per_s=float(batch["input_ids"].size) / (time.perf_counter() - t0))
        return out


def grpo(config: Any, *, steps: int | None = None, out: str | None = None, stream=None,
         reward_fn: Callable | list[Callable] | None = None) -> dict:
    """GRPO on `zerojax.rlhf.data` (prompts) with `reward_fn` (a callable, or the config's)."""
    online.check_single_process()
    run = common.prepare(config, "grpo")
    s = run.settings
    G = s["num_generations"]
    if run.global_rows % G:
        raise ConfigError(f"train_batch_size {run.global_rows} counts completions and must be a multiple of "
                          f"zerojax.rlhf.num_generations {G} (prompts per step = train_batch_size / num_generations)")
    prompts, report = online.read_prompts(s["data"], run.tokenizer, max_prompt_len=s["max_prompt_len"],
                                          chat_render=run.chat_render)
    common.check_vocab([(p.ids,) for p in prompts], run.vocab_size, s["data"])
    algorithm = GRPO(run, reward_fn)
    batches = rdata.ExampleBatches(prompts, run.global_rows // G, list, seed=run.config.zerojax.seed,
                                   process_index=0, process_count=1)
    return online.run_loop(run, algorithm, batches, report, steps=steps, out=out, stream=stream)
