"""What PPO and GRPO share: prompt data, the actor module, and the online loop.

The loop, once per step: take the next prompts, sync the actor's params into the rollout
engine, sample completions, score them, and hand everything to the algorithm's update (one
or more compiled train steps). Output is `zerojax train`'s: `metrics.jsonl` every
`train.log_every` steps (TRL's metric names plus `generation_s` and `training_s`), a loss
curve, the progress bar, checkpoints every `train.checkpoint_every` steps and at the end,
and resume from the output directory's `latest`: params, optimizer states, data position
and the sampling seeds' position (seeds derive from (seed, step, row), so a resumed run
samples what the uninterrupted one would have). The actor's checkpoint is the run's
(`zerojax export`, `serve` and `init_from` read it as the policy); other engines (PPO's
critic) save under `OUT/<name>` with the same tag first, so `latest` never names a step
whose critic is missing.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from zerojax import checkpoint
from zerojax.config import ConfigError
from zerojax.rlhf import common, data as rdata, losses


# ---------------------------------------------------------------- prompts
@dataclasses.dataclass
class Prompt:
    ids: list[int]
    text: str
    columns: dict          # the line's other fields, handed to reward functions


def read_prompts(path: str, tokenizer, *, max_prompt_len: int, chat_render=None
                 ) -> tuple[list[Prompt], rdata.Report]:
    """Prompts of a JSONL file: `{"prompt": str, ...}` or `{"messages": [...]}` (rendered
    with the generation prompt); every line must carry the same other fields."""
    from zerojax.serve.protocol import plain_chat

    report, out, columns = rdata.Report(), [], None
    for number, record in rdata.read_jsonl(path):
        where = f"{path}:{number}"
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                raise rdata.DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
            text = (chat_render or plain_chat)(messages)
        else:
            text = rdata._text(record, "prompt", where)
        extra = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
        if columns is None:
            columns = sorted(extra)
        elif sorted(extra) != columns:
            raise rdata.DataError(f"{where}: fields {sorted(extra)} differ from the first line's {columns}; every "
                                  f"line needs the same columns (they reach the reward functions as lists)")
        ids = list(tokenizer.encode(text))
        if not ids:
            raise rdata.DataError(f"{where}: the prompt is empty")
        if len(ids) > max_prompt_len:
            report.prompts_cut += 1
            ids = ids[-max_prompt_len:]
        out.append(Prompt(ids, text, extra))
    report.examples = len(out)
    return out, report



# ---------------------------------------------------------------- the actor
class Actor(nnx.Module):
    """The policy, with a frozen reference (KL) and an EMA copy where the run has them.

    `reference` and `ema` are named in `zerojax_frozen`: sharded like the policy, no
    optimizer state, never changed by a train step (the EMA is updated after it).
    `objective` picks the loss of `__call__`: "grpo" (clipped ratio + beta * k3 to the
    reference, per-token `weights` from the loss type) or "ppo" (clipped ratio on
    per-token advantages). Log-probs are of `logits / temperature`, as the rollout drew.
    """

    def __init__(self, policy: nnx.Module, *, reference: nnx.Module | None = None, ema: nnx.Module | None = None,
                 objective: str = "grpo", temperature: float = 1.0, clip_low: float = 0.2,
                 clip_high: float | None = None, beta: float = 0.0):
        self.policy, self.reference, self.ema = policy, reference, ema
        self.zerojax_frozen = tuple(n for n, m in (("reference", reference), ("ema", ema)) if m is not None)
        self.objective, self.temperature = objective, temperature
        self.clip_low, self.clip_high, self.beta = clip_low, clip_high, beta
        self.zerojax_casts_per_layer = bool(getattr(policy, "zerojax_casts_per_layer", False))

    @property
    def zerojax_model_section(self) -> dict | None:
        """The checkpoint is the policy's: served, exported and `init_from`-ed as the model."""
        return common.policy_model_section(self.policy)

    def token_logps(self, model: nnx.Module, ids_BL: jax.Array) -> jax.Array:
        """[B, L] log p(token t+1) at position t under `logits / temperature`."""
        logits = model.logits(ids_BL).astype(jnp.float32) / self.temperature
        return losses.token_logps(logits, ids_BL)

    def score(self, batch) -> dict[str, jax.Array]:
        """The rollout's log-probs under the policy (and the reference), no gradient."""
        ids = jnp.asarray(batch["input_ids"])
        out = {"logps": self.token_logps(self.policy, ids)}
        if self.reference is not None:
            out["ref_logps"] = self.token_logps(self.reference, ids)
        return out

    def __call__(self, batch) -> tuple[jax.Array, dict]:
        ids = jnp.asarray(batch["input_ids"])
        logps = self.token_logps(self.policy, ids)
        current = jax.lax.stop_gradient(logps)
        if "old_logps" in batch:        # a later epoch / mini-batch: the rollout-time log-probs
            old = jnp.where(batch["old_is_current"][:, None] > 0, current, batch["old_logps"])
        else:                           # one update per rollout: old is exactly this forward
            old = current
        if self.objective == "ppo":
            return losses.clipped_policy_loss(logps, old, batch["advantages"], batch["weights"],
                                              clip_low=self.clip_low, clip_high=self.clip_high)
        ref = None
        if self.beta > 0:
            ref = jax.lax.stop_gradient(self.token_logps(self.reference, ids))
        return losses.grpo_loss(logps, old, ref, batch["advantages"], batch["weights"], epsilon_low=self.clip_low,
                                epsilon_high=self.clip_high, beta=self.beta)


def forward(engine, method: str) -> Callable:
    """`fn(batch) -> pytree`: the engine's module `method` on its live params, compiled once
    per batch shape (a rollout's scores: no gradient, no update)."""
    from zerojax import compute

    graphdef, policy = engine.graphdef, engine.policy

    @jax.jit
    def run(params, model_state, batch):
        with compute.use(policy):
            return getattr(nnx.merge(graphdef, params, model_state), method)(batch)

    return lambda batch: run(engine.state.params, engine.state.model_state, engine.shard_batch(batch))


def ema_updater(engine, decay: float) -> Callable[[], None]:
    """`update()`: ema <- decay * ema + (1 - decay) * policy, one compiled program on device in
    the params' layout (compiled once, called after every actor step)."""
    def step(params):
        ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), params["ema"],
                           params["policy"])
        return {**params, "ema": ema}

    compiled = jax.jit(step, out_shardings=engine.state_shardings.params, donate_argnums=0)

    def update() -> None:
        engine.state = engine.state._replace(params=compiled(engine.state.params))
    return update


# ---------------------------------------------------------------- the loop
class Algorithm(Protocol):
    engines: dict            # name -> Engine; "actor" is the run's checkpoint, others save under OUT/name

    def init_weights(self) -> None: ...

    def step(self, index: int, prompts: list[Prompt]) -> dict: ...   # metrics, tokens_per_s included


def check_single_process() -> None:
    if jax.process_count() > 1:
        raise ConfigError("online RLHF (ppo, grpo) runs in one process (it may span all its devices); "
                          "run it without zerojax launch")


def run_loop(run: common.Run, algorithm: Algorithm, batches: rdata.ExampleBatches, report: rdata.Report, *,
             steps: int | None, out: str | None, stream=None) -> dict:
    from zerojax.trainer import DEFAULT_OUT, StopRequest, make_monitor

    config, train_cfg = run.config, run.config.zerojax.train
    steps = steps or train_cfg["steps"]
    if not steps:
        raise ConfigError('how many steps? pass steps= (--steps) or set "zerojax": {"train": {"steps": N}}')
    out = out or train_cfg["out"] or DEFAULT_OUT
    common.warn_cuts(run, report)
    actor = algorithm.engines["actor"]

    start = 0
    if checkpoint.latest_tag(out) is not None:
        where, client_state = actor.load_checkpoint(out)
        tag = os.path.basename(where)
        for name, engine in algorithm.engines.items():
            if name != "actor":
                engine.load_checkpoint(os.path.join(out, name), tag=tag)
        start = int(client_state.get("step", actor.global_steps))
        batches.restore(client_state["data"])
    else:
        algorithm.init_weights()

    monitor = make_monitor(config, out, steps=steps, start=start, stream=stream)
    if start:
        monitor.message(f"resumed from {out} at step {start}")

    def save(step: int) -> None:
        tag = f"global_step{actor.global_steps}"
        for name, engine in algorithm.engines.items():
            if name != "actor":
                engine.save_checkpoint(os.path.join(out, name), tag=tag, async_save=False)
        actor.save_checkpoint(out, tag=tag, client_state={"data": batches.state(), "step": step},
                              async_save=False)

    step, last_saved, last, t_run = start, None, {}, time.perf_counter()
    stop = StopRequest()
    with stop.installed():
        while step < steps:
            t0 = time.perf_counter()
            metrics = algorithm.step(step, batches.next())
            step += 1
            record = {k: float(v) for k, v in metrics.items()}
            record["step_time_s"] = time.perf_counter() - t0
            last = record
            if step % (train_cfg["log_every"] or 1) == 0 or step == start + 1 or step == steps or stop.requested:
                monitor.log(step, record)
            if train_cfg["checkpoint_every"] and step % train_cfg["checkpoint_every"] == 0:
                save(step)
                last_saved = step
            if stop.requested:
                monitor.message(f"stop requested: saving a checkpoint at step {step}")
                break
        if last_saved != step and step > start:
            save(step)
    summary = {"steps": step, "out": out, "final_loss": last.get("loss", math.nan),
               "reward_mean": last.get("reward_mean", math.nan), "wall_s": time.perf_counter() - t_run}
    if stop.requested:
        summary["stopped_early"] = True
    monitor.close(summary)
    summary["data"] = dataclasses.asdict(report)
    return summary
