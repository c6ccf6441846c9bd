"""The device mesh: axis sizes from the config, devices from JAX.

Axes, outermost to innermost (tensor on the fastest links):
  replica  copies of the whole ZeRO group (hpZ / MiCS style); never sharded over
  pipe     pipeline stages
  data     data parallelism; ZeRO shards over data and sequence together
  sequence sequence parallelism (ranks hold the same params, as in DeepSpeed-Ulysses)
  tensor   Megatron-style tensor parallelism
Every axis is always present (size 1 when unused) so specs never depend on the layout.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from zerojax.config import Config, ConfigError

AXES = ("replica", "pipe", "data", "sequence", "tensor")
BATCH_AXES = ("replica", "data")      # rows of a batch are split over these
ZERO_AXES = ("data", "sequence")      # ZeRO partitions state over these


def axis_sizes(config: Config, device_count: int) -> dict[str, int]:
    """Resolve every axis size; `data: -1` takes the devices the other axes leave."""
    explicit = config.zerojax.mesh
    from_deepspeed = {
        "tensor": config.tensor_parallel_size,
        "sequence": config.sequence_parallel_size,
        "pipe": config.pipeline.stages if isinstance(config.pipeline.stages, int) else 1,
    }
    sizes = {"replica": explicit.replica, "pipe": explicit.pipe, "data": explicit.data,
             "sequence": explicit.sequence, "tensor": explicit.tensor}
    for axis, ds_size in from_deepspeed.items():
        if ds_size != 1 and sizes[axis] not in (1, ds_size):
            raise ConfigError(
                f"zerojax.mesh.{axis} is {sizes[axis]} but the DeepSpeed key for it says {ds_size}; "
                f"set one of them (or both to the same value)")
        sizes[axis] = max(sizes[axis], ds_size)
    for axis, size in sizes.items():
        if axis != "data" and size < 1:
            raise ConfigError(f"zerojax.mesh.{axis} must be >= 1, got {size}")
    others = math.prod(size for axis, size in sizes.items() if axis != "data")
    if sizes["data"] == -1:
        if device_count % others:
            raise ConfigError(
                f"mesh: {device_count} devices cannot be split into "
                + " × ".join(f"{a} {s}" for a, s in sizes.items() if a != "data")
                + f" = {others} per data rank; choose sizes whose product divides {device_count}")
        sizes["data"] = device_count // others
    elif sizes["data"] < 1:
        raise ConfigError(f"zerojax.mesh.data must be -1 (all remaining devices) or >= 1, got {sizes['data']}")
    total = math.prod(sizes.values())
    if total > device_count:
        raise ConfigError(
            "mesh: " + " × ".join(f"{a} {s}" for a, s in sizes.items())
            + f" = {total} devices, but only {device_count} are available; shrink an axis")
    return sizes


def build_mesh(config: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over the first `prod(sizes)` devices, axes in AXES order, Auto axis types.

    Auto (not Explicit) axes: the engine relies on GSPMD propagation inside the step.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = axis_sizes(config, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    used = devices[: math.prod(shape)]
    if len(used) == len(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=used)
    return Mesh(np.asarray(used).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """DeepSpeed's data-parallel size: the ranks that see different rows."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def zero_group_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in ZERO_AXES)
