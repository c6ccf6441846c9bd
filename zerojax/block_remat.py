"""Remat per block for a user's module: its repeated submodules, each checkpointed.

The reference models remat inside their layer scan. A user's module knows nothing of
zerojax, but a transformer written in Flax almost always keeps its blocks in a sequence
(`nnx.List`, a list or tuple attribute) of modules of one class. Checkpointing each such
block keeps only what the policy saves of it for the backward pass and recomputes the
rest one block at a time; a checkpoint over the whole loss instead recomputes every block
at the start of the backward pass and so keeps as much at once as no remat at all.

The blocks are found on the merged module inside the traced step, and each one's class
is swapped for a subclass whose `__call__` runs under `checkpoint_without_cse`: param
paths, state and the user's class stay as they are (the subclass is a per-trace view,
never stored).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def repeated_blocks(model: nnx.Module) -> list[nnx.Module]:
    """The outermost submodules kept in a sequence beside at least one other of their class.

    A block inside a found block is not returned (it is rematted with its parent)."""
    siblings: dict[tuple, list[tuple[tuple, nnx.Module]]] = {}
    for path, module in nnx.iter_modules(model):
        if path and isinstance(path[-1], int):
            siblings.setdefault((path[:-1], type(module)), []).append((tuple(path), module))
    found = [item for group in siblings.values() if len(group) >= 2 for item in group]
    paths = {path for path, _ in found}
    outermost = lambda path: not any(path[:n] in paths for n in range(len(path)))
    return [module for path, module in sorted(found, key=lambda item: item[0]) if outermost(path)]


def checkpoint_without_cse(f: Callable, policy: Callable[..., bool] | None) -> Callable:
    """`jax.checkpoint(f, policy=policy)` whose recomputation XLA cannot merge back.

    XLA:CPU drops the optimization barrier `jax.checkpoint` puts around the recomputation
    (none is left in the compiled program), and CSE then merges the recomputed values with
    the forward's: a checkpoint outside a loop keeps exactly as much as none (the same temp
    bytes, to the byte; the reference models' layer scan is immune, its forward and
    backward being separate loop bodies). Here the backward pass adds a zero XLA cannot
    know (from the cotangent: 1 only where it is NaN) to the saved residuals before
    recomputing, so the recomputation reads different values and stays a recomputation.
    """
    @jax.custom_vjp
    def run(*args):
        return f(*args)

    def forward(*args):
        return jax.vjp(jax.checkpoint(f, policy=policy), *args)

    def backward(vjp_fn, cotangent):
        floats = [g for g in jax.tree.leaves(cotangent) if jnp.issubdtype(g.dtype, jnp.floating)]
        first = floats[0].ravel()[0] if floats else jnp.float32(0)
        unknown_zero = first != first
        vjp_fn = jax.tree.map(lambda r: r + unknown_zero.astype(r.dtype)
                              if jnp.issubdtype(r.dtype, jnp.floating) else r, vjp_fn)
        return vjp_fn(cotangent)

    run.defvjp(forward, backward)
    return run


@functools.cache
def _rematted_class(cls: type, policy: Callable[..., bool] | None) -> type:
    def __call__(self, *args, **kwargs):
        graphdef, params, rest = nnx.split(self, nnx.Param, ...)
        if jax.tree.leaves(rest):
            # State besides params (RNG counters, batch statistics) changes as the block
            # runs; a custom VJP cannot carry that out, so such a block runs as written.
            return cls.__call__(self, *args, **kwargs)
        # Arrays go through the checkpoint; anything else (flags, None masks, config values)
        # stays a Python value the block's own code can branch on.
        leaves, treedef = jax.tree.flatten((args, kwargs))
        traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

        def pure(params, *arrays):
            full = list(leaves)
            for i, x in zip(traced, arrays):
                full[i] = x
            a, k = jax.tree.unflatten(treedef, full)
            return cls.__call__(nnx.merge(graphdef, params, rest), *a, **k)

        return checkpoint_without_cse(pure, policy)(params, *(leaves[i] for i in traced))

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__})


def remat_blocks(model: nnx.Module, policy: Callable[..., bool] | None) -> None:
    """Run each of `model`'s repeated blocks under `checkpoint_without_cse(policy)` (the
    engine checks beforehand that there are some; else it checkpoints the whole loss)."""
    for block in repeated_blocks(model):
        object.__setattr__(block, "__class__", _rematted_class(type(block), policy))
