"""Where every array lives: logical axis names -> PartitionSpecs, and ZeRO as a spec transform.

Two layouts per param (Levanter's parameter vs compute split, which *is* ZeRO-3):
  compute  how the math wants it: the logical names through RULES (tensor parallel axes);
  storage  how it is kept between steps: compute + the ZeRO axes on one more dimension.
Stage 1 stores optimizer state in the ZeRO layout, stage 2 also gradients (inside the
step), stage 3 params too (gathered to compute layout per layer by `zerojax.compute`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zerojax.mesh import ZERO_AXES

# One table maps every logical name the reference models use to mesh axes.
RULES: Mapping[str, Any] = {
    "batch": ("replica", "data"),
    "length": "sequence",
    "embed": None,
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": "pipe",
    "positions": None,
}


def logical_axes(params_state: nnx.State) -> dict:
    """Pure-dict tree of logical-name tuples (None for a param that carries no names)."""
    out: dict = {}
    for path, var in nnx.to_flat_state(params_state):
        meta = var.get_metadata()
        axes = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
        if axes is not None:
            axes = tuple(axes)
            if len(axes) != len(var.shape):
                raise ValueError(f"param {'/'.join(map(str, path))} has {len(var.shape)} dims "
                                 f"but {len(axes)} logical names {axes}")
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = axes
    return out


# Megatron's rule: with more tensor ranks than K/V heads the K/V heads are replicated; a
# vocabulary the tensor size does not divide (GPT-2's 50257) stays whole rather than padded.
REPLICATE_IF_UNEVEN = ("kv_heads", "vocab")


def fit_rules(abstract_params: Any, logical: Any, mesh: Mesh, rules: Mapping[str, Any] = RULES) -> dict:
    """The rules table adapted to this model and mesh; impossible splits are ConfigErrors.

    Every param dimension a rule maps onto mesh axes must divide evenly: K/V heads and
    the vocabulary fall back to replication, anything else (attention heads, the MLP
    width) names the param, the numbers, and the sizes that would work.
    """
    from zerojax.config import ConfigError

    fitted = dict(rules)
    flat_axes = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: x is None or isinstance(x, tuple))[0]
    flat_params = jax.tree.leaves(abstract_params)
    for (path, axes), param in zip(flat_axes, flat_params):
        for name, size in zip(axes or (), param.shape):
            if name is None or fitted.get(name) is None:
                continue
            mesh_axes = _axes_of(fitted[name])
            ways = math.prod(mesh.shape[a] for a in mesh_axes)
            if size % ways == 0:
                continue
            if name in REPLICATE_IF_UNEVEN:
                fitted[name] = None
                continue
            where = jax.tree_util.keystr(path, simple=True, separator=".")
            fits = [d for d in range(1, size + 1) if size % d == 0]
            raise ConfigError(
                f"{where}: its {name!r} dimension is {size}, which {' × '.join(mesh_axes)} size {ways} "
                f"does not divide; use a {'/'.join(mesh_axes)} size that divides {size} ({fits})")
    return fitted


def spec_for(axes: tuple | None, ndim: int, rules: Mapping[str, Any] = RULES) -> PartitionSpec:
    """Compute layout for one array; unnamed arrays are replicated."""
    if axes is None:
        return PartitionSpec(*([None] * ndim))
    out = []
    for name in axes:
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in the partition table; "
                           f"known: {sorted(rules)}")
        out.append(None if name is None else rules[name])
    return PartitionSpec(*out)


def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def add_zero_axes(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh,
                  zero_axes: tuple[str, ...] = ZERO_AXES) -> PartitionSpec:
    """Add the ZeRO axes to the largest dimension that stays evenly divisible.

    jax.Array shards must be even, so a dimension is chosen among those the shard
    count divides; if none does, fewer ZeRO axes are tried (outer first), and an array
    no dimension of which divides stays as it is (it is small: a bias or a norm scale).
    Never an error for an awkward shape.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries for a in _axes_of(e)}
    candidates = [a for a in zero_axes if a not in used and mesh.shape[a] > 1]
    for k in range(len(candidates), 0, -1):
        axes = tuple(candidates[:k])
        group = math.prod(mesh.shape[a] for a in axes)
        best = None
        for dim, size in enumerate(shape):
            existing = math.prod(mesh.shape[a] for a in _axes_of(entries[dim]))
            if size % (existing * group) == 0 and (best is None or size // existing > shape[best] // math.prod(
                    mesh.shape[a] for a in _axes_of(entries[best]))):
                best = dim
        if best is not None:
            entries[best] = _axes_of(entries[best]) + axes
            entries[best] = entries[best][0] if len(entries[best]) == 1 else entries[best]
            return PartitionSpec(*entries)
    return PartitionSpec(*entries)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """PartitionSpec trees (pure dicts shaped like params) for one ZeRO stage."""

    mesh: Mesh
    stage: int
    logical: Any        # tuples of logical names (or None)
    compute: Any        # param layout the math uses
    zero: Any           # compute layout + ZeRO axes
    params: Any         # stored params: zero at stage 3 (above the persistence threshold)
    grads: Any          # gradients leaving the backward pass: zero at stage >= 2

    def shardings(self, specs: Any) -> Any:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))

    def optimizer_specs(self, tx: optax.GradientTransformation, abstract_opt_state: Any,
                        subtrees: tuple[str, ...] | None = None) -> Any:
        """Param-shaped optimizer leaves follow the ZeRO layout from stage 1; scalars replicate.
        `subtrees`: the state covers only these top-level param subtrees (the others frozen)."""
        per_param = self.zero if self.stage >= 1 else self.compute
        if subtrees is not None:
            per_param = {k: per_param[k] for k in subtrees}
        return optax.tree_map_params(
            tx, lambda _leaf, spec: spec, abstract_opt_state, per_param,
            transform_non_params=lambda leaf: PartitionSpec(*([None] * np.ndim(leaf))),
            is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_layout(abstract_params: Any, logical: Any, mesh: Mesh, stage: int,
                persistence_threshold: int = 0, rules: Mapping[str, Any] = RULES) -> StateLayout:
    """Spec trees for params given as a pure dict of ShapeDtypeStructs."""
    is_axes = lambda x: x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))
    compute = jax.tree.map(lambda axes, p: spec_for(axes, len(p.shape), rules), logical, abstract_params,
                           is_leaf=is_axes)
    zero = jax.tree.map(lambda spec, p: add_zero_axes(spec, p.shape, mesh), compute, abstract_params,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))
    keep_whole = lambda p: math.prod(p.shape) < persistence_threshold
    params = jax.tree.map(
        lambda c, z, p: z if stage >= 3 and not keep_whole(p) else c, compute, zero, abstract_params,
        is_leaf=lambda x: isinstance(x, PartitionSpec))
    grads = zero if stage >= 2 else compute
    return StateLayout(mesh=mesh, stage=stage, logical=logical, compute=compute, zero=zero,
                       params=params, grads=grads)
