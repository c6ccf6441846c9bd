"""Flat-bucket collectives: ZeRO's gathers and gradient reductions, one collective per bucket.

XLA places one collective per array (the combiners make that a tuple of arrays). Over
XLA:CPU's gloo transport a collective costs per buffer, not per byte: a layer's
gradient all-reduce as a tuple of 16 buffers took ~34 ms, one concatenated buffer ~5 ms
(benchmarks/NOTES.md). DeepSpeed and DDP reduce flat buckets for the same reason. So a
bucketed step runs the forward and backward passes inside a `shard_map` over the data
axis, each device on its own rows, and moves the params and gradients as flat buckets:

  gather   (ZeRO-3 params stored sharded) the local shards of a bucket's leaves,
           flattened and concatenated, are all-gathered at once and cut back into whole
           arrays. Its custom VJP is the bucket's reduce-scatter.
  reduce   the local gradients of a bucket's leaves, flattened and concatenated, are
           summed over the devices at once: as an all-to-all plus a local sum where the
           gradient is kept sharded (ZeRO-2/3; XLA:CPU lowers `psum_scatter` to an
           all-reduce and a slice, which is slower), as one all-reduce where it is whole.

Each device's loss is its own rows' loss unless the model computes a mean over the whole
batch with `compute.batch_mean` (the reference models do): then it is the global loss on
every device, and summing the devices' gradients gives the global gradient exactly as the
one-device step computes it. A user's module that averages its own rows gets DeepSpeed's
and DDP's rule instead: the devices' losses and gradients are averaged (the same function
whenever every device's rows weigh the same, e.g. no ignored tokens).

The plan (`plan`) says whether a layout can be bucketed at all: only the data axis may
split anything (no tensor, sequence or pipeline parallelism), and ZeRO-3's gathered params
must fit in `stage3_max_live_parameters`, since they are gathered for the whole step.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

AXIS = "data"


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Which param leaves move in which bucket; leaves are numbered in `jax.tree.leaves` order."""

    devices: int                          # size of the data axis
    stored_dims: tuple[int | None, ...]   # per leaf: the dim its stored param is split on
    # per leaf: the dim its gradient, optimizer state and update are split on (ZeRO >= 1;
    # stage 1 too, since its update needs only the shard), None at stage 0
    grad_dims: tuple[int | None, ...]
    gather_buckets: tuple[tuple[int, ...], ...]   # stored split: gathered for the step together
    reduce_buckets: tuple[tuple[int, ...], ...]   # stored whole: gradients reduced together
    regather_buckets: tuple[tuple[int, ...], ...]  # stored whole, updated split: re-gathered together

    def grad_specs(self, params: Any) -> Any:
        return _specs(self.grad_dims, params)

    def stored_specs(self, params: Any) -> Any:
        return _specs(self.stored_dims, params)


def _specs(dims: tuple[int | None, ...], params: Any) -> Any:
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [spec_of(d, x.ndim) for d, x in zip(dims, leaves)])


def _split_dim(spec: PartitionSpec) -> int | None:
    """The dim a ZeRO spec splits over the data axis (None: whole)."""
    for dim, entry in enumerate(spec):
        if AXIS in _names(entry):
            return dim
    return None


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _group(leaves: list[int], sizes: list[int], limit: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive leaves packed into buckets of at most `limit` elements (a bigger leaf alone)."""
    buckets, current, filled = [], [], 0
    for i in leaves:
        if current and filled + sizes[i] > limit:
            buckets.append(tuple(current))
            current, filled = [], 0
        current.append(i)
        filled += sizes[i]
    if current:
        buckets.append(tuple(current))
    return tuple(buckets)


def unsupported_reason(mesh: Mesh, layout: Any) -> str | None:
    """Why this mesh and layout cannot run bucketed (None: it can)."""
    others = [f"{a}={n}" for a, n in mesh.shape.items() if a != AXIS and n > 1]
    if others:
        return f"only the data axis may be larger than 1 (this mesh has {', '.join(others)})"
    # (Only the data axis is larger than 1, so a compute layout splits nothing; a ZeRO spec
    # may still name the size-1 `sequence` axis next to `data`: it splits nothing either.)
    return None


def select(config: Any, layout: Any, abstract_params: Any, *, other_step: str | None) -> BucketPlan | None:
    """The bucket plan for this run, or None for XLA's own collectives.

    `zerojax.collectives`: "bucketed" asks for it (a ConfigError says why it cannot run);
    "auto" picks it where it was measured to win: XLA:CPU across processes (gloo), where a
    collective costs per buffer. In one process XLA:CPU's collectives are memory copies, and
    on GPU/TPU XLA's combiners and NCCL/ICI make one collective per tensor cheap.
    `other_step`: the step is not the plain one (offload, NVMe, pipeline), named for the message.
    """
    from zerojax.config import ConfigError

    mode = config.zerojax.collectives
    mesh = layout.mesh
    if mode == "xla" or mesh.shape[AXIS] == 1:
        return None
    if mode == "auto" and not (mesh.devices.flat[0].platform == "cpu" and jax.process_count() > 1):
        return None
    zero = config.zero_optimization
    why = unsupported_reason(mesh, layout) or (f"it runs the plain step only, not {other_step}"
                                               if other_step else None)
    if why is None:
        chosen = plan(layout, abstract_params, gather_bucket_size=zero.stage3_prefetch_bucket_size,
                      reduce_bucket_size=zero.reduce_bucket_size,
                      allgather_bucket_size=zero.allgather_bucket_size)
        gathered = gathered_elements(chosen, abstract_params)
        if gathered <= zero.stage3_max_live_parameters:
            return chosen
        why = (f"a bucketed step gathers all {gathered:,} ZeRO-3 params at once, more than "
               f"zero_optimization.stage3_max_live_parameters ({zero.stage3_max_live_parameters:,}); "
               f"raise it, or keep the per-layer gathers")
    if mode == "auto":
        return None
    raise ConfigError(f"zerojax.collectives \"bucketed\" cannot run here: {why}. "
                      f"Use \"auto\" or \"xla\"")


def gathers_whole_step(config: Any, layout: Any, abstract_params: Any, *, other_step: str | None) -> bool:
    """ZeRO-3 under "auto" in one CPU process: XLA's collectives, but the params gathered
    once for the whole step instead of once per layer.

    In one process XLA:CPU's collectives are memory copies, and the host holds every
    device's memory anyway, so the per-layer gathers buy no memory worth their cost: each
    layer gathers twice (forward, and again for the backward pass, since remat "full" must
    not keep gathered params) and the layer scan serializes the copies. Gathering once also
    lets remat "minimal" run beside ZeRO-3 (per-layer gathers in a scan under "minimal"
    deadlocked XLA:CPU's in-process collectives). Measured on the reference GPT at 1 x 2,
    alternating steps: 431 vs 463 and 518 vs 555 ms (benchmarks/NOTES.md). As with buckets,
    the gathered params must fit in `stage3_max_live_parameters`.
    """
    zero = config.zero_optimization
    mesh = layout.mesh
    if (config.zerojax.collectives != "auto" or layout.stage < 3 or other_step is not None
            or mesh.devices.flat[0].platform != "cpu" or jax.process_count() > 1 or mesh.shape[AXIS] == 1
            or unsupported_reason(mesh, layout) is not None):
        return False
    is_spec = lambda x: isinstance(x, PartitionSpec)
    stored = [_split_dim(s) for s in jax.tree.leaves(layout.params, is_leaf=is_spec)]
    return _elements_stored_split(stored, abstract_params) <= zero.stage3_max_live_parameters


def plan(layout: Any, abstract_params: Any, *, gather_bucket_size: int, reduce_bucket_size: int,
         allgather_bucket_size: int) -> BucketPlan:
    """Buckets for a data-only layout (`unsupported_reason` is None)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    stored = [_split_dim(s) for s in jax.tree.leaves(layout.params, is_leaf=is_spec)]
    zero = [_split_dim(s) for s in jax.tree.leaves(layout.zero, is_leaf=is_spec)]
    grads = zero if layout.stage >= 1 else [None] * len(zero)
    sizes = [math.prod(p.shape) for p in jax.tree.leaves(abstract_params)]
    split = [i for i, d in enumerate(stored) if d is not None]
    whole = [i for i, d in enumerate(stored) if d is None]
    for i in split:
        if grads[i] != stored[i]:
            raise ValueError(f"leaf {i}: stored split on dim {stored[i]} but its gradient on {grads[i]}")
    return BucketPlan(devices=layout.mesh.shape[AXIS], stored_dims=tuple(stored), grad_dims=tuple(grads),
                      gather_buckets=_group(split, sizes, gather_bucket_size),
                      reduce_buckets=_group(whole, sizes, reduce_bucket_size),
                      regather_buckets=_group([i for i in whole if grads[i] is not None], sizes,
                                              allgather_bucket_size))


def keep_whole_params_whole(layout: Any) -> Any:
    """The ZeRO-3 layout with the ZeRO split taken off the gradients and optimizer state of
    the params stored whole (those under the persistence threshold)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    zero = jax.tree.map(lambda stored, compute, z: compute if _split_dim(stored) is None else z,
                        layout.params, layout.compute, layout.zero, is_leaf=is_spec)
    return dataclasses.replace(layout, zero=zero, grads=zero)


def gathered_elements(plan_: BucketPlan, abstract_params: Any) -> int:
    """Elements a bucketed step gathers (ZeRO-3's params stored split), all live at once."""
    return _elements_stored_split(plan_.stored_dims, abstract_params)


def _elements_stored_split(stored_dims: Any, abstract_params: Any) -> int:
    """Elements of the leaves stored split (a dim in `stored_dims`, per leaf; None: whole)."""
    return sum(math.prod(p.shape) for d, p in zip(stored_dims, jax.tree.leaves(abstract_params))
               if d is not None)


# ----------------------------------------------------------------------------- flat layouts
# A leaf of shape S split on dim d over P devices: device p holds the slice p of d. The
# "rows" form [P, n] puts device p's part of the whole array in row p, flattened.

def _to_rows(x: jax.Array, dim: int, devices: int) -> jax.Array:
    shape = x.shape[:dim] + (devices, x.shape[dim] // devices) + x.shape[dim + 1:]
    return jnp.moveaxis(x.reshape(shape), dim, 0).reshape(devices, -1)


def _from_rows(rows: jax.Array, dim: int, shard_shape: tuple[int, ...]) -> jax.Array:
    devices = rows.shape[0]
    x = jnp.moveaxis(rows.reshape((devices,) + shard_shape), 0, dim)
    return x.reshape(shard_shape[:dim] + (devices * shard_shape[dim],) + shard_shape[dim + 1:])


def _cut(flat: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    """The last axis of `flat` cut into consecutive pieces of these shapes' sizes."""
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[..., offset:offset + n].reshape(flat.shape[:-1] + shape))
        offset += n
    return out


def reduce_scatter_rows(rows: jax.Array) -> jax.Array:
    """[P, n] per device -> [n]: row p summed over the devices lands on device p.
    All-to-all plus a local sum (one buffer), not `psum_scatter` (an all-reduce on XLA:CPU)."""
    return jnp.sum(jax.lax.all_to_all(rows, AXIS, 0, 0, tiled=True).reshape(rows.shape), axis=0)


def _all_gather_flat(dims: tuple[int, ...], shards: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Whole arrays from each device's shards (split on `dims`) by one all-gather."""
    flat = jnp.concatenate([s.reshape(-1) for s in shards])
    rows = jax.lax.all_gather(flat, AXIS, axis=0, tiled=False)      # [P, n]
    pieces = _cut(rows, [s.shape for s in shards])
    return tuple(_from_rows(p.reshape(p.shape[0], -1), d, s.shape) for p, d, s in zip(pieces, dims, shards))


def _gather_bucket(dims: tuple[int, ...], shards: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """One all-gather for the whole bucket; the backward pass is one reduce-scatter."""

    @jax.custom_vjp
    def gather(shards):
        return _all_gather_flat(dims, shards)

    def fwd(shards):
        return gather(shards), [s.shape for s in shards]

    def bwd(shapes, cotangents):
        devices = cotangents[0].shape[dims[0]] // shapes[0][dims[0]]
        rows = jnp.concatenate([_to_rows(c, d, devices) for c, d in zip(cotangents, dims)], axis=1)
        return (tuple(_cut(reduce_scatter_rows(rows), shapes)),)

    gather.defvjp(fwd, bwd)
    return gather(tuple(shards))


def _after(inputs: list, before: list) -> list:
    """`inputs`, not usable before `before` is computed: a collective fed from here starts
    after the collectives that made `before`. Devices must start collectives in one order
    (XLA:CPU's in-process collectives deadlock otherwise, and gloo would pair up the wrong
    buffers), and XLA may run independent ones in any order."""
    if not before:
        return inputs
    return list(jax.lax.optimization_barrier((tuple(inputs), tuple(before)))[0])


def _gather_in_order(leaves: list, buckets: tuple[tuple[int, ...], ...], dims: tuple[int | None, ...],
                     gather_bucket: Callable) -> list:
    """`leaves` with each bucket's shards replaced by the whole arrays, one
    `gather_bucket(dims, shards)` per bucket, each started after the one before."""
    leaves, previous = list(leaves), []
    for bucket in buckets:
        shards = _after([leaves[i] for i in bucket], previous)
        whole = previous = list(gather_bucket(tuple(dims[i] for i in bucket), tuple(shards)))
        for i, x in zip(bucket, whole):
            leaves[i] = x
    return leaves


def gather(plan_: BucketPlan, params: Any) -> Any:
    """The whole params from the local shards of those stored split (inside the shard_map)."""
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, _gather_in_order(leaves, plan_.gather_buckets, plan_.stored_dims,
                                                        _gather_bucket))


def reduce_whole_leaves(plan_: BucketPlan, grads: Any) -> Any:
    """Sum over the devices the local gradients of the params stored whole, one collective
    per bucket: all-to-all + sum into the gradient's shards where it is kept split,
    all-reduce where it is kept whole. (Those stored split were reduced by `gather`'s VJP.)"""
    leaves, treedef = jax.tree.flatten(grads)
    leaves = list(leaves)
    # After the gather's VJP reduce-scatters (the gradients of the leaves stored split).
    previous = [leaves[i] for i, d in enumerate(plan_.stored_dims) if d is not None]
    for bucket in plan_.reduce_buckets:
        split = [i for i in bucket if plan_.grad_dims[i] is not None]
        whole = [i for i in bucket if plan_.grad_dims[i] is None]
        if split:
            grads = _after([leaves[i] for i in split], previous)
            rows = jnp.concatenate([_to_rows(g, plan_.grad_dims[i], plan_.devices) for g, i in zip(grads, split)], axis=1)
            shapes = [_shard_shape(leaves[i].shape, plan_.grad_dims[i], plan_.devices) for i in split]
            previous = _cut(reduce_scatter_rows(rows), shapes)
            for i, x in zip(split, previous):
                leaves[i] = x
        if whole:
            grads = _after([leaves[i] for i in whole], previous)
            flat = jax.lax.psum(jnp.concatenate([g.reshape(-1) for g in grads]), AXIS)
            previous = _cut(flat, [leaves[i].shape for i in whole])
            for i, x in zip(whole, previous):
                leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def _shard_shape(shape: tuple[int, ...], dim: int, devices: int) -> tuple[int, ...]:
    return shape[:dim] + (shape[dim] // devices,) + shape[dim + 1:]


def spec_of(dim: int | None, ndim: int) -> PartitionSpec:
    return PartitionSpec(*[AXIS if d == dim else None for d in range(ndim)])


# ----------------------------------------------------------------------------- outside the step's shard_map

def regather(plan_: BucketPlan, mesh: Mesh, params: Any) -> Any:
    """Updated params from their update layout (`grad_dims`) to their stored layout: the
    leaves stored whole are all-gathered one bucket at a time (ZeRO-1/2's post-update
    gather), the others pass through."""
    leaves, treedef = jax.tree.flatten(params)

    def per_device(*leaves):
        return tuple(_gather_in_order(leaves, plan_.regather_buckets, plan_.grad_dims, _all_gather_flat))

    grad_specs = jax.tree.leaves(plan_.grad_specs(params), is_leaf=lambda x: isinstance(x, PartitionSpec))
    stored_specs = jax.tree.leaves(plan_.stored_specs(params), is_leaf=lambda x: isinstance(x, PartitionSpec))
    # (check_vma off: an all-gather's result is typed per-device, though it is the same everywhere.)
    out = jax.shard_map(per_device, mesh=mesh, in_specs=tuple(grad_specs), out_specs=tuple(stored_specs),
                        check_vma=False)(*leaves)
    return jax.tree.unflatten(treedef, list(out))


def global_norm(plan_: BucketPlan, mesh: Mesh, grads: Any) -> jax.Array:
    """The gradients' global L2 norm with one all-reduce of one number (XLA reduces one
    partial sum per array: a tuple collective, per-buffer cost over gloo)."""
    leaves = jax.tree.leaves(grads)

    def per_device(*leaves):
        split = sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                    for g, d in zip(leaves, plan_.grad_dims) if d is not None)
        whole = sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                    for g, d in zip(leaves, plan_.grad_dims) if d is None)
        # A whole gradient is the same on every device: count it once.
        mine = split + jnp.where(jax.lax.axis_index(AXIS) == 0, whole, 0.0)
        return jnp.sqrt(jax.lax.psum(mine, AXIS))

    specs = jax.tree.leaves(plan_.grad_specs(grads), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.shard_map(per_device, mesh=mesh, in_specs=tuple(specs), out_specs=PartitionSpec())(*leaves)
