"""Pipeline parallelism inside the one SPMD program: GPipe and 1F1B over the `pipe` axis.

A pipelined model has three parts (the reference models have them; a user model that
implements the same three methods is pipelined the same way):
    embed(input_ids) -> x          first stage
    run_layers(x) -> x             each stage, over its slice of the stacked `layers` params
    head_loss(x, batch) -> loss    last stage
Stacked layer params are sharded over `pipe` along their `layers` axis (stage s holds
layers [s L/P, (s+1) L/P)); every other param (embedding, head, norms) is held by every
stage — still ZeRO-sharded over `data` — and used only by the first / last stage.

Both schedules run in a `shard_map` manual over `pipe` only, so `data`, `sequence` and
`tensor` stay with GSPMD and ZeRO / tensor parallelism work inside a stage. Activations
move with `ppermute` on a `lax.scan` over ticks; the micro-batches are DeepSpeed's
`gradient_accumulation_steps` (M), and each micro-batch's loss counts 1/M.

  gpipe  all forwards (tick t: stage s runs micro-batch t - s), then autodiff runs the
         backwards. The scan keeps every micro-batch's stage input: memory grows with M.
  1f1b   each tick a stage runs one forward (micro-batch t - s) and one backward
         (micro-batch t - (2P - 2 - s)) with its own VJP, recomputing the stage from its
         saved input. Inputs live from their forward to their backward, at most 2P - 1
         per stage: memory grows with P, not M. The last stage turns a micro-batch around
         in the tick it finishes its forward. A stage with no micro-batch in a slot
         (warm-up, cool-down) skips that slot's work under `lax.cond`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from zerojax import compute

PIPE = "pipe"
REQUIRED = ("embed", "run_layers", "head_loss")


def stage_mask(logical: Any) -> Any:
    """True for params stacked over layers (split across stages), False for the rest."""
    return jax.tree.map(lambda axes: bool(axes) and axes[0] == "layers", logical,
                        is_leaf=lambda x: x is None or isinstance(x, tuple))


def _select(mask, a, b):
    return jax.tree.map(lambda m, x, y: x if m else y, mask, a, b)


def _where(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _zeros_like(tree):
    # Shape and dtype only: a traced value's sharding names the full mesh, which does not
    # match the partly-manual mesh inside the pipeline's shard_map.
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


class _Parts:
    """The model's three parts as pure functions of (params, ...)."""

    def __init__(self, graphdef, model_state, cast_whole: bool):
        self.graphdef, self.model_state, self.cast_whole = graphdef, model_state, cast_whole

    def model(self, params):
        if self.cast_whole:
            params = jax.tree.map(compute.cast, params)
        return nnx.merge(self.graphdef, params, self.model_state)

    def embed(self, params, micro):
        return self.model(params).embed(micro["input_ids"])

    def layers(self, params, x):
        return self.model(params).run_layers(x)

    def loss(self, params, x, micro):
        return jnp.asarray(self.model(params).head_loss(x, micro), jnp.float32)


def _shift(x, forward: bool, stages: int):
    pairs = [(i, i + 1) for i in range(stages - 1)] if forward else [(i + 1, i) for i in range(stages - 1)]
    return jax.lax.ppermute(x, PIPE, pairs)


def _gpipe(parts: _Parts, params, micro, *, stages: int, micro_batches: int, scale):
    """Forward over M + P - 1 ticks; returns the scaled mean loss (differentiated outside)."""
    stage = jax.lax.axis_index(PIPE)
    x_shape = jax.eval_shape(parts.embed, params, jax.tree.map(lambda m: m[0], micro))

    def tick(carry, t):
        received, total = carry
        m = t - stage
        valid = (m >= 0) & (m < micro_batches)
        mb = jax.tree.map(lambda a: a[jnp.clip(m, 0, micro_batches - 1)], micro)
        x = jnp.where(stage == 0, parts.embed(params, mb), received)
        y = parts.layers(params, x)
        loss = jax.lax.cond((stage == stages - 1) & valid,
                            lambda: parts.loss(params, y, mb), lambda: jnp.float32(0.0))
        return (_shift(y, True, stages), total + loss), None

    init = (jnp.zeros(x_shape.shape, x_shape.dtype), jnp.float32(0.0))
    (_, total), _ = jax.lax.scan(tick, init, jnp.arange(micro_batches + stages - 1))
    return jax.lax.psum(total, PIPE) * scale


def _one_f_one_b(parts: _Parts, params, micro, *, stages: int, micro_batches: int, scale, mask):
    """Interleaved forward/backward ticks with per-stage VJPs; returns (loss sum, grads)."""
    stage = jax.lax.axis_index(PIPE)
    first, last = stage == 0, stage == stages - 1
    slots = 2 * stages - 1
    x_shape = jax.eval_shape(parts.embed, params, jax.tree.map(lambda m: m[0], micro))
    zeros_x = jnp.zeros(x_shape.shape, x_shape.dtype)
    seed = scale.astype(jnp.float32)

    def pick(m):
        return jax.tree.map(lambda a: a[jnp.clip(m, 0, micro_batches - 1)], micro)

    def tick(carry, t):
        fwd_in, bwd_in, saved, grads, loss_sum = carry
        # Forward of micro-batch t - s.
        m_f = t - stage
        valid_f = (m_f >= 0) & (m_f < micro_batches)
        mb_f = pick(m_f)
        x = jnp.where(first, parts.embed(params, mb_f), fwd_in)
        saved = jax.lax.dynamic_update_index_in_dim(
            saved, jnp.where(valid_f, x, saved[m_f % slots]), m_f % slots, 0)
        # Warm-up and cool-down ticks have nothing to run on some stages: skip the work there
        # (the predicate is the same on every device of a stage, so collectives inside match).
        y = jax.lax.cond(valid_f, lambda: parts.layers(params, x), lambda: jnp.zeros(x.shape, x.dtype))

        def head():
            loss, pull = jax.vjp(lambda p, h: parts.loss(p, h, mb_f), params, y)
            g_params, g_y = pull(seed)
            return loss, g_params, g_y

        def no_head():
            return jnp.float32(0.0), _zeros_like(params), jnp.zeros(y.shape, y.dtype)

        loss, g_head, g_y_last = jax.lax.cond(last & valid_f, head, no_head)

        # Backward of micro-batch t - (2P - 2 - s), recomputing the stage from its input.
        m_b = t - (2 * stages - 2 - stage)
        valid_b = (m_b >= 0) & (m_b < micro_batches)
        g_y = jnp.where(last, g_y_last, bwd_in)
        def stage_grads():
            _, pull = jax.vjp(parts.layers, params, saved[m_b % slots])
            return pull(g_y)

        g_stage, g_x = jax.lax.cond(valid_b, stage_grads,
                                    lambda: (_zeros_like(params), jnp.zeros(x.shape, x.dtype)))

        def embed_grads():
            _, pull_embed = jax.vjp(lambda p: parts.embed(p, pick(m_b)), params)
            return pull_embed(g_x)[0]

        g_embed = jax.lax.cond(first & valid_b, embed_grads, lambda: _zeros_like(params))
        g_stage = _where(valid_b, g_stage, _zeros_like(g_stage))
        grads = jax.tree.map(lambda a, s_, h, e: a + s_ + h + e, grads, g_stage, g_head, g_embed)
        return (_shift(y, True, stages), _shift(jnp.where(valid_b, g_x, 0.0).astype(g_x.dtype), False, stages),
                saved, grads, loss_sum + loss), None

    init = (zeros_x, zeros_x, jnp.zeros((slots, *x_shape.shape), x_shape.dtype),
            _zeros_like(params), jnp.float32(0.0))
    (_, _, _, grads, loss_sum), _ = jax.lax.scan(tick, init, jnp.arange(micro_batches + 2 * stages - 2))
    # Shared params (embedding, head) got their gradients on one stage each: sum over stages.
    grads = _select(mask, grads, jax.tree.map(lambda g: jax.lax.psum(g, PIPE), grads))
    return jax.lax.psum(loss_sum, PIPE) / micro_batches, grads


def loss_and_grads(*, graphdef, model_state, params, micro, logical, mesh, schedule: str,
                   micro_batches: int, scale, cast_whole: bool) -> tuple[jax.Array, Any]:
    """Mean micro-batch loss, and gradients of `scale` × the SUM of micro-batch losses
    (what the non-pipelined accumulation produces; the step divides by scale × M).

    `micro` is the batch split into [M, rows/M, ...].
    """
    stages = mesh.shape[PIPE]
    mask = stage_mask(logical)
    param_specs = jax.tree.map(lambda m: P(PIPE) if m else P(), mask)
    micro_spec = jax.tree.map(lambda _: P(), micro)
    parts = _Parts(graphdef, model_state, cast_whole)
    scale = jnp.asarray(scale, jnp.float32)

    if schedule == "gpipe":
        def scaled(params):
            run = jax.shard_map(
                lambda p, mb: _gpipe(parts, p, mb, stages=stages, micro_batches=micro_batches, scale=scale),
                mesh=mesh, in_specs=(param_specs, micro_spec), out_specs=P(), axis_names={PIPE},
                check_vma=False)
            return run(params, micro)

        scaled_sum, grads = jax.value_and_grad(scaled)(params)
        return scaled_sum / scale / micro_batches, grads

    run = jax.shard_map(
        lambda p, mb: _one_f_one_b(parts, p, mb, stages=stages, micro_batches=micro_batches,
                                   scale=scale, mask=mask),
        mesh=mesh, in_specs=(param_specs, micro_spec), out_specs=(P(), param_specs),
        axis_names={PIPE}, check_vma=False)
    return run(params, micro)
