"""ZeRO-Offload: optimizer state and params in host memory, with JAX memory kinds.

DeepSpeed's `zero_optimization.offload_optimizer.device: "cpu"` keeps the optimizer state
(and, under bf16/fp16, the fp32 master params) in host memory; `offload_param.device:
"cpu"` (ZeRO-3) keeps the params there too. Here the offloaded arrays stay in
`engine.state` with shardings whose `memory_kind` is a host memory (`pinned_host` for
DeepSpeed's `pin_memory: true`, `unpinned_host` for its default false, where the device
offers it; else `pinned_host`). The one compiled train step moves them to device memory
(`jax.device_put(x, NamedSharding(..., memory_kind="device"))` inside jit) and its
`out_shardings` put the new values back on the host: MaxText's way, which keeps the update
a fused device computation and leaves the transfers to XLA's host-offload passes. For
element-wise optimizers (Adam, AdamW, SGD, Lion, Adagrad) the update streams: the
layer-stacked state comes to the device one layer at a time (`streamed_update`), so the
device never holds the whole optimizer state; others (LAMB, a user's optax chain) move it
whole.
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
import optax
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


def place(shardings: Any, kind: str | None) -> tuple[Any, Any]:
    """(the shardings the state is stored with, the device shardings the step moves it to):
    `shardings` in host memory `kind` and in device memory, or unchanged and None when
    `kind` is None (nothing offloaded)."""
    if kind is None:
        return shardings, None
    return with_memory_kind(shardings, kind), with_memory_kind(shardings, DEVICE)


# ---- the streamed update -------------------------------------------------------------
# Optimizers whose update is element-wise: any slicing of params, grads and state gives
# the slices of the whole update, so it can run one layer at a time. (LAMB's per-tensor
# trust ratio is not; a user's optax chain may not be.)
ELEMENTWISE_OPTIMIZERS = ("adam", "adamw", "sgd", "lion", "adagrad")


def _keys(path) -> tuple[str, ...]:
    return tuple(jax.tree_util.keystr((k,)) for k in path)


STACKED, PARAM, OTHER = "stacked", "param", "other"


def _leaf_kinds(tree: Any, params: Any, logical: Any) -> list[str]:
    """For each leaf of `tree` (the params or an optimizer state): STACKED for a
    layer-stacked param or its state, PARAM for another param or its state, OTHER for the
    optimizer's own values (step count, hyperparameters). A state leaf belongs to the
    param whose key path ends its own path and whose shape it has; a param is stacked when
    its first logical axis is `layers`."""
    kinds = {}
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        node = logical
        for key in _keys(path):
            node = node.get(key[2:-2]) if isinstance(node, dict) else None
        kinds[_keys(path)] = (_shape(p), STACKED if node and node[0] == "layers" else PARAM)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys, kind = _keys(path), OTHER
        for start in range(len(keys)):
            found = kinds.get(keys[start:])
            if found is not None and found[0] == _shape(leaf):
                kind = found[1]
                break
        out.append(kind)
    return out


def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def streamed_update(tx, grads: Any, opt_state: Any, params: Any, *, logical: Any, overflow: jax.Array,
                    state_on_host: bool, params_on_host: bool) -> tuple[Any, Any]:
    """The optimizer update with the host-resident state brought to the device one layer at a time.

    The layer-stacked leaves (params, grads, and their optimizer state) are updated in a
    scan over the layers: each step copies one layer's slices to the device, updates them,
    and copies the results back to the host, so the device holds one layer's state at a
    time instead of the whole (MaxText's layer-wise host offload). The other leaves are
    updated once, whole. Both passes call `tx.update` on the full tree structure, with
    the leaves the pass does not own cut to zero length (free element-wise), and the
    optimizer's own scalars (step count, hyperparameters) taken from the second pass.
    `overflow` (fp16) keeps the old values, decided on the device before the copy back.
    Returns (new params, new optimizer state); only for element-wise optimizers.
    """
    to_device = lambda x: jax.device_put(x, jax.memory.Space.Device)
    to_host = lambda x: jax.device_put(x, jax.memory.Space.Host)
    keep = lambda new, old: jnp.where(overflow, old, new)
    # A zero-length slice, on the device: its update costs nothing.
    empty = lambda x, on_host: to_device(x[:0]) if on_host else x[:0]
    g_leaves, g_def = jax.tree.flatten(grads)
    p_leaves, p_def = jax.tree.flatten(params)
    s_leaves, s_def = jax.tree.flatten(opt_state)
    p_kinds = _leaf_kinds(params, params, logical)
    s_kinds = _leaf_kinds(opt_state, params, logical)
    p_dev = [to_device(x) if params_on_host and k != STACKED else x for x, k in zip(p_leaves, p_kinds)]
    s_dev = [to_device(x) if state_on_host and k != STACKED else x for x, k in zip(s_leaves, s_kinds)]

    def update(g, s, p):
        """tx.update + apply on flat leaf lists; old values kept on overflow."""
        upd, s_new = tx.update(g_def.unflatten(g), s_def.unflatten(s), p_def.unflatten(p))
        p_new = jax.tree.leaves(optax.apply_updates(p_def.unflatten(p), upd))
        return ([keep(n, o) for n, o in zip(p_new, p)],
                [keep(n, o) for n, o in zip(jax.tree.leaves(s_new), s)])

    # The leaves that are not stacked: once, whole.
    cut = lambda leaves, kinds, on_host: [empty(x, on_host) if k == STACKED else x
                                          for x, k in zip(leaves, kinds)]
    new_p, new_s = update(cut(g_leaves, p_kinds, False), cut(s_dev, s_kinds, state_on_host),
                          cut(p_dev, p_kinds, params_on_host))

    # The stacked leaves: one layer's slices at a time, from and back to the host.
    gi = [i for i, k in enumerate(p_kinds) if k == STACKED]
    si = [i for i, k in enumerate(s_kinds) if k == STACKED]
    if gi:
        def layer(_, xs):
            g_sl, p_sl, s_sl = xs
            g = [empty(x, False) for x in g_leaves]
            p = [empty(x, params_on_host and k == STACKED) for x, k in zip(p_dev, p_kinds)]
            s = [x if k == OTHER else empty(x, state_on_host and k == STACKED)
                 for x, k in zip(s_dev, s_kinds)]
            for k, i in enumerate(gi):
                g[i] = g_sl[k]
                p[i] = to_device(p_sl[k]) if params_on_host else p_sl[k]
            for k, i in enumerate(si):
                s[i] = to_device(s_sl[k]) if state_on_host else s_sl[k]
            p_new, s_new = update(g, s, p)
            p_out = [to_host(p_new[i]) if params_on_host else p_new[i] for i in gi]
            s_out = [to_host(s_new[i]) if state_on_host else s_new[i] for i in si]
            return None, (p_out, s_out)

        xs = ([g_leaves[i] for i in gi], [p_leaves[i] for i in gi], [s_leaves[i] for i in si])
        _, (p_stacked, s_stacked) = jax.lax.scan(layer, None, xs)
        for k, i in enumerate(gi):
            new_p[i] = p_stacked[k]
        for k, i in enumerate(si):
            new_s[i] = s_stacked[k]
    return p_def.unflatten(new_p), s_def.unflatten(new_s)
