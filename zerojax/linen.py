"""Flax Linen modules as zerojax models, through flax's own NNX bridge."""
from __future__ import annotations

from typing import Any, Mapping

from flax import linen as nn
from flax import nnx
from flax.nnx import bridge


def from_linen(module: nn.Module, example_batch: Mapping[str, Any], *, seed: int = 0) -> nnx.Module:
    """Wrap a Linen module whose `__call__(batch)` returns the loss (or `(loss, metrics)`).

    Params are initialised once from `example_batch`; `nn.with_partitioning` names carry
    over as logical axes, so Linen models get ZeRO and tensor-parallel layouts too.
    """
    wrapped = bridge.ToNNX(module, rngs=nnx.Rngs(seed))
    bridge.lazy_init(wrapped, example_batch)
    return wrapped
