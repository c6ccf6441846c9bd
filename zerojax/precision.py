"""Dtype policy and DeepSpeed's dynamic fp16 loss scaler, as pure jnp state.

Params and optimizer state stay fp32 (master weights); the compute dtype is bf16 or
fp16 when enabled. The loss scaler follows DeepSpeed's DynamicLossScaler exactly:
  overflow: if hysteresis is 1 (or only 1 is configured) halve the scale (not below
            min_loss_scale), else spend one unit of hysteresis;
  clean:    with consecutive_hysteresis refill the hysteresis; every loss_scale_window
            iterations since the last overflow double the scale (and, without
            consecutive_hysteresis, refill the hysteresis there).
A static `loss_scale` > 0 never changes. Without fp16 the scale is a constant 1.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from zerojax.config import Config


def compute_dtype(config: Config):
    if config.fp16.enabled:
        return jnp.float16
    if config.bf16.enabled:
        return jnp.bfloat16
    return jnp.float32


def compute_in(model: nnx.Module, dtype: Any) -> None:
    """Make a user's module (merged inside the traced step) compute in `dtype`, as
    DeepSpeed's bf16/fp16 casts a torch module.

    Flax layers compute in their `dtype` attribute and promote otherwise. The params are
    already cast, but `nnx.Embed`'s `dtype` defaults to float32, so a module that starts
    with one computed everything after it in fp32 whatever its params' dtype (the user
    GPT in "bf16": 99 of 99 dots fp32). Every submodule whose `dtype` is fp32 is set to
    `dtype`; None (follow the inputs) and explicit 16-bit choices stay.
    """
    for _, module in nnx.iter_modules(model):
        current = getattr(module, "dtype", None)
        if current is not None and jnp.dtype(current) == jnp.float32:
            object.__setattr__(module, "dtype", dtype)


class LossScaleState(NamedTuple):
    scale: jax.Array            # f32 scalar
    since_overflow: jax.Array   # int32: iterations since the last overflow, DeepSpeed's cur_iter - last_overflow_iter
    hysteresis: jax.Array       # int32: overflows still tolerated before the scale drops


def is_dynamic(config: Config) -> bool:
    return config.fp16.enabled and config.fp16.loss_scale == 0


def init_loss_scale(config: Config) -> LossScaleState:
    fp16 = config.fp16
    if not fp16.enabled:
        scale = 1.0
    elif fp16.loss_scale > 0:
        scale = float(fp16.loss_scale)
    else:
        scale = 2.0 ** fp16.initial_scale_power
    return LossScaleState(scale=jnp.asarray(scale, jnp.float32),
                          since_overflow=jnp.asarray(1, jnp.int32),
                          hysteresis=jnp.asarray(fp16.hysteresis, jnp.int32))


def update_loss_scale(state: LossScaleState, overflow: jax.Array, config: Config) -> LossScaleState:
    """One DeepSpeed `update_scale(overflow)` call, traceable."""
    if not is_dynamic(config):
        return state
    fp16 = config.fp16
    delayed_shift = fp16.hysteresis
    min_scale = jnp.float32(fp16.min_loss_scale)

    # Overflow branch.
    drop = (delayed_shift == 1) | (state.hysteresis == 1)
    scale_on_overflow = jnp.where(drop, jnp.maximum(state.scale / 2.0, min_scale), state.scale)
    hyst_on_overflow = jnp.where(drop, state.hysteresis, state.hysteresis - 1)

    # Clean branch.
    grow = state.since_overflow % fp16.loss_scale_window == 0
    hyst_clean = state.hysteresis
    if fp16.consecutive_hysteresis:
        hyst_clean = jnp.full_like(hyst_clean, delayed_shift)
    else:
        hyst_clean = jnp.where(grow, delayed_shift, hyst_clean)
    scale_clean = jnp.where(grow, state.scale * 2.0, state.scale)

    return LossScaleState(
        scale=jnp.where(overflow, scale_on_overflow, scale_clean),
        since_overflow=jnp.where(overflow, 1, state.since_overflow + 1).astype(jnp.int32),
        hysteresis=jnp.where(overflow, hyst_on_overflow, hyst_clean).astype(jnp.int32),
    )


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
