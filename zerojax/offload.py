"""ZeRO-Offload: optimizer state and params in host memory, with JAX memory kinds.

DeepSpeed's `zero_optimization.offload_optimizer.device: "cpu"` keeps the optimizer state
(and, under bf16/fp16, the fp32 master params) in host memory; `offload_param.device:
"cpu"` (ZeRO-3) keeps the params there too. Here the offloaded arrays stay in
`engine.state` with shardings whose `memory_kind` is a host memory (`pinned_host` for
DeepSpeed's `pin_memory: true`, `unpinned_host` for its default false, where the device
offers it; else `pinned_host`). The one compiled train step moves them to device memory
(`jax.device_put(x, NamedSharding(..., memory_kind="device"))` inside jit) and its
`out_shardings` put the new values back on the host: MaxText's way, which keeps the update
a fused device computation and leaves the transfers to XLA's host-offload passes.
Checkpoints, resharding and `memory_report()` see the state as any other.

Master params under bf16/fp16: the state's params are the fp32 masters and the step
casts them per layer, so there is no separate 16-bit copy to keep on the device as
DeepSpeed does; with the optimizer offloaded the masters go to the host with it and the
device holds no persistent model state between steps at all (more saved than DeepSpeed's
2 bytes/param, for 2 more bytes/param read from the host per step).

On CPU the host and device memories are the same RAM: XLA:CPU runs the moves but saves
nothing, so CPU tests check placement and numerics; savings show on an accelerator.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

DEVICE = "device"


def _host_kind(mesh, pin_memory: bool, key: str) -> str:
    wanted = "pinned_host" if pin_memory else "unpinned_host"
    offered = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    if wanted not in offered:
        wanted = "pinned_host"
    if wanted not in offered:
        from zerojax.config import ConfigError
        raise ConfigError(
            f"zero_optimization.{key}.device \"cpu\": {mesh.devices.flat[0].platform} devices offer "
            f"no host memory kind (they have {sorted(offered)}); set device \"none\"")
    return wanted


def optimizer_memory_kind(config, mesh) -> str | None:
    """The host memory kind for the optimizer state, or None when it stays on the device."""
    section = config.zero_optimization.offload_optimizer
    if not section.enabled:
        return None
    return _host_kind(mesh, section.pin_memory, "offload_optimizer")


def param_memory_kind(config, mesh, compute_dtype) -> str | None:
    """The host memory kind for the (fp32 master) params, or None when they stay on the device.

    `offload_param` puts them there; so does `offload_optimizer` when the compute dtype is
    16-bit, because then the params in the state are the optimizer's fp32 masters.
    """
    zero = config.zero_optimization
    if zero.offload_param.enabled:
        return _host_kind(mesh, zero.offload_param.pin_memory, "offload_param")
    if zero.offload_optimizer.enabled and jnp.dtype(compute_dtype) != jnp.float32:
        return optimizer_memory_kind(config, mesh)
    return None


def with_memory_kind(shardings: Any, kind: str) -> Any:
    """The same shardings placed in memory `kind`."""
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings,
                        is_leaf=lambda x: isinstance(x, NamedSharding))
