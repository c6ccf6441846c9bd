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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ComputePolicy:
    """Everything model code needs to know about the layout it runs under."""

    dtype: Any = jnp.float32                       # matmul / activation dtype
    mesh: Mesh | None = None                       # None: no layout constraints at all
    rules: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # logical name -> mesh axes
    gather_params: bool = False                    # ZeRO-3: gather a layer's params at use
    remat: str = "none"                            # "full" | "minimal" | "none"
    kernels: str = "xla"                           # "xla" | "pallas"
    sequence_parallel: str = "ulysses"             # attention over a sharded length: "ulysses" | "ring"

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


def remat(fn: Callable) -> Callable:
    """Wrap a layer body in `jax.checkpoint` per the policy's remat mode.

    "full" saves nothing inside the layer (so ZeRO-3's gathered params are re-gathered in
    the backward pass rather than kept); "minimal" saves matmul outputs that need no
    batch dimension contraction; "none" keeps everything.
    """
    mode = current().remat
    if mode == "none":
        return fn
    if mode == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if mode == "minimal":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"unknown remat mode {mode!r}; expected 'full', 'minimal' or 'none'")
