"""How model code computes: dtype, layouts and remat, set by the engine while it traces.

Model code never sees the engine. It asks this module to bring a layer's params to
their compute form (`for_compute`: cast to the compute dtype and, under ZeRO-3, gather
them to their compute layout) and to pin activation layouts (`constrain`). Outside an
engine (a model called on its own) the default policy makes both no-ops in fp32, so a
reference model runs unchanged in a notebook.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zerojax.config import REMAT_MATMUL_NAMES, REMAT_NAMES

LogicalAxes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ComputePolicy:
    """Everything model code needs to know about the layout it runs under."""

    dtype: Any = jnp.float32                       # matmul / activation dtype
    mesh: Mesh | None = None                       # None: no layout constraints at all
    rules: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # logical name -> mesh axes
    gather_params: bool = False                    # ZeRO-3: gather a layer's params at use
    remat: Any = "none"                            # "full" | "minimal" | "none" | config.RematPolicy
    kernels: str = "xla"                           # "xla" | "pallas"
    sequence_parallel: str = "ulysses"             # attention over a sharded length: "ulysses" | "ring"
    # Inside a bucketed step (zerojax.buckets) each device runs on its own rows: the mesh
    # axis they are split over, so a batch mean can sum over it; None elsewhere.
    rows_axis: str | None = None

    def spec(self, logical_axes: LogicalAxes) -> PartitionSpec:
        """PartitionSpec for logical axis names through the rules table (unknown name: error)."""
        axes = []
        for name in logical_axes:
            if name is None:
                axes.append(None)
                continue
            if name not in self.rules:
                raise KeyError(
                    f"logical axis {name!r} has no rule; known: {sorted(self.rules)}")
            axes.append(self.rules[name])
        return PartitionSpec(*axes)


_POLICY: contextvars.ContextVar[ComputePolicy] = contextvars.ContextVar(
    "zerojax_compute_policy", default=ComputePolicy())


def current() -> ComputePolicy:
    return _POLICY.get()


@contextlib.contextmanager
def use(policy: ComputePolicy):
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Pin an activation (or param) to the layout its logical axes name; no-op without a mesh."""
    policy = current()
    if policy.mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(policy.mesh, policy.spec(logical_axes)))


def batch_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """`total / max(count, 1)` over the whole batch: a loss's sum over its counted items and
    their number. Inside a bucketed step the device's own sums are added over the devices
    first, so every device holds the one-device loss (not the mean of its rows' losses)."""
    axis = current().rows_axis
    if axis is not None:        # one all-reduce for both numbers
        total, count = jax.lax.psum(jnp.stack([total, jnp.asarray(count, total.dtype)]), axis)
    return total / jnp.maximum(count, 1.0)


def cast(x: jax.Array) -> jax.Array:
    """Cast a floating array to the compute dtype (integers pass through)."""
    dtype = current().dtype
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
        return x.astype(dtype)
    return x


def for_compute(params: Any, logical_axes: Any) -> Any:
    """Bring one layer's params (a pytree) to compute form: compute dtype, compute layout.

    Under ZeRO-3 the stored params are sharded over `data`; constraining them to their
    compute spec here makes XLA all-gather them at this point, once per layer. The cast
    happens per layer too, so no full low-precision copy of the model is ever built.
    `logical_axes` is a pytree of tuples matching `params`.
    """
    policy = current()

    def one(p, axes):
        p = cast(p)
        if policy.gather_params and policy.mesh is not None:
            p = jax.lax.with_sharding_constraint(p, NamedSharding(policy.mesh, policy.spec(axes)))
        return p

    return jax.tree.map(one, params, logical_axes,
                        is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


_BASE_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "none": jax.checkpoint_policies.everything_saveable,
}


def name(x: jax.Array, tensor: str) -> jax.Array:
    """Tag an activation inside a layer with one of `config.REMAT_NAMES`, so a per-tensor remat
    policy can save, offload or recompute it (a no-op outside `jax.checkpoint`)."""
    if tensor not in REMAT_NAMES:
        raise ValueError(f"unknown activation name {tensor!r}; add it to zerojax.config.REMAT_NAMES")
    return checkpoint_name(x, tensor)


def checkpoint_policy(remat: Any) -> Callable | None:
    """The `jax.checkpoint` policy for a remat mode or `RematPolicy`; None: no checkpointing.

    A `RematPolicy` decides its named tensors (save / offload to pinned host memory /
    recompute); its base mode decides the other names, and unnamed values are recomputed
    (kept under "none").
    """
    if isinstance(remat, str):
        if remat not in _BASE_POLICIES:
            raise ValueError(f"unknown remat mode {remat!r}; expected 'full', 'minimal' or 'none'")
        return None if remat == "none" else _BASE_POLICIES[remat]
    # The base decides by name too: a dot-based "minimal" would keep a matmul output that a
    # name in `remat` asks to recompute (the policy sees the dot, not the name after it).
    listed = set(remat.save) | set(remat.offload) | set(remat.remat)
    kept = {"full": (), "minimal": REMAT_MATMUL_NAMES, "none": REMAT_NAMES}[remat.policy]
    save = tuple(remat.save) + tuple(n for n in kept if n not in listed)
    by_name = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=save, names_which_can_be_offloaded=remat.offload,
        offload_src="device", offload_dst="pinned_host")
    if remat.policy != "none":
        return by_name

    def policy(prim, *args, **params):
        if prim.name == "name":
            return by_name(prim, *args, **params)
        return _BASE_POLICIES["none"](prim, *args, **params)

    return policy


def whole_model_policy(remat: Any) -> Callable | None:
    """The checkpoint policy for a module that does not remat per layer (a user's module):
    wrapped around its whole loss, as `remat` wraps each layer of the reference models.

    Over the whole model "full" (save nothing) would save no memory: the backward pass
    recomputes the whole forward and keeps all of it while it runs. So "full" and
    "minimal" both keep the matmul outputs only: element-wise intermediates (GELU's,
    LayerNorm's) are recomputed. A `RematPolicy` applies as given (names the module tags
    with `jax.ad_checkpoint.checkpoint_name`). The engine applies this only when the config
    asks for a remat mode: for a user's GPT on CPU it measured no faster than none
    (benchmarks/NOTES.md), so "auto" leaves user modules alone."""
    if isinstance(remat, str):
        return None if remat == "none" else _BASE_POLICIES["minimal"]
    return checkpoint_policy(remat)


def remat(fn: Callable) -> Callable:
    """Wrap a layer body in `jax.checkpoint` per the policy's remat setting.

    "full" saves nothing inside the layer (so ZeRO-3's gathered params are re-gathered in
    the backward pass rather than kept); "minimal" saves matmul outputs that need no
    batch dimension contraction; "none" keeps everything; a `RematPolicy` also saves,
    offloads or recomputes named activations (`name`).
    """
    policy = checkpoint_policy(current().remat)
    return fn if policy is None else jax.checkpoint(fn, policy=policy)
