"""ZeRO-Offload of the optimizer state to host memory, with JAX memory kinds.

DeepSpeed's `zero_optimization.offload_optimizer.device: "cpu"` keeps the optimizer state
in host memory. Here the state's arrays stay in `engine.state` with shardings whose
`memory_kind` is a host memory (`pinned_host` for DeepSpeed's `pin_memory: true`,
`unpinned_host` for its default false, where the device offers it; else `pinned_host`).
The one compiled train step moves the state to device memory for the update
(`jax.device_put(x, NamedSharding(..., memory_kind="device"))` inside jit) and its
`out_shardings` put the new state back on the host: MaxText's way, which keeps the update
a fused device computation and leaves the transfers to XLA's host-offload passes.
Checkpoints, resharding and `memory_report()` see the state as any other.

On CPU the host and device memories are the same RAM: XLA:CPU runs the moves but saves
nothing, so CPU tests check placement and numerics; savings show on an accelerator.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding

DEVICE = "device"


def optimizer_memory_kind(config, mesh) -> str | None:
    """The host memory kind for the optimizer state, or None when it stays on the device."""
    section = config.zero_optimization.offload_optimizer
    if not section.enabled:
        return None
    wanted = "pinned_host" if section.pin_memory else "unpinned_host"
    offered = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    if wanted not in offered:
        wanted = "pinned_host"
    if wanted not in offered:
        from zerojax.config import ConfigError
        raise ConfigError(
            f"zero_optimization.offload_optimizer.device \"cpu\": {mesh.devices.flat[0].platform} "
            f"devices offer no host memory kind (they have {sorted(offered)}); set device \"none\"")
    return wanted


def with_memory_kind(shardings: Any, kind: str) -> Any:
    """The same shardings placed in memory `kind`."""
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings,
                        is_leaf=lambda x: isinstance(x, NamedSharding))
