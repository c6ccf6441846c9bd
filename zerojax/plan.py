"""Memory planning. For now: DeepSpeed's analytic model-state estimators.

`estimate_zero2_model_states_mem_needs` and `estimate_zero3_model_states_mem_needs` take
the same arguments (and defaults) as DeepSpeed's functions of those names and return the
same numbers: bytes of host memory per node and of device memory per device needed for
the model states (params, gradients, Adam states) of mixed-precision training, times an
`additional_buffer_factor` on the host side. They know nothing of activations or of
the compiled program; they are the cross-check column for `zerojax plan`.

The `_all_cold` variants print DeepSpeed's table of every offload option for a model
described by its parameter counts; the `_all_live` variants count the parameters of an
`nnx.Module` (or a pytree of arrays / `ShapeDtypeStruct`s) first. Their table has
DeepSpeed's layout and wording, with offload devices written as DeepSpeed's
documentation shows them (`offload_param=cpu `; DeepSpeed itself prints the enum's
qualified name, `OffloadDeviceEnum.cpu`, under Python 3.11 and later).

Bytes per parameter, mixed precision with Adam (what the formulas add up):
  2   16-bit params (fp16/bf16), what the forward and backward read
  2   16-bit gradients
  4   fp32 gradients (the optimizer's copy)
  4   fp32 master params
  8   fp32 Adam momentum (4) and variance (4)
  4   one fp32 copy of the model per process, loaded before ZeRO partitions it
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import jax
from flax import nnx

__all__ = [
    "estimate_zero2_model_states_mem_needs",
    "estimate_zero2_model_states_mem_needs_all_cold",
    "estimate_zero2_model_states_mem_needs_all_live",
    "estimate_zero3_model_states_mem_needs",
    "estimate_zero3_model_states_mem_needs_all_cold",
    "estimate_zero3_model_states_mem_needs_all_live",
    "param_counts",
]

GiB = 2**30


# ----------------------------------------------------------------------------- checks

def _check_count(name: str, value: Any, *, minimum: float, inclusive: bool) -> None:
    """A finite real number above `minimum` (or equal to it when `inclusive`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (value == minimum and not inclusive):
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be {relation} {minimum:g}, got {value!r}")


def _check_hardware(num_gpus_per_node: Any, num_nodes: Any, additional_buffer_factor: Any) -> None:
    for name, value in (("num_gpus_per_node", num_gpus_per_node), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    _check_count("additional_buffer_factor", additional_buffer_factor, minimum=0, inclusive=False)


def _check_zero3_counts(total_params: Any, largest_layer_params: Any) -> None:
    _check_count("total_params", total_params, minimum=0, inclusive=False)
    _check_count("largest_layer_params", largest_layer_params, minimum=0, inclusive=True)
    if largest_layer_params > total_params:
        raise ValueError(f"largest_layer_params ({largest_layer_params}) must not exceed "
                         f"total_params ({total_params})")


# ----------------------------------------------------------------------------- ZeRO-2

def estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=1, num_nodes=1,
                                          cpu_offload=True, additional_buffer_factor=1.5):
    """(host bytes per node, device bytes per device) for ZeRO stage 1/2 model states.

    Stage 2 shards gradients and optimizer states over all `num_nodes * num_gpus_per_node`
    devices; the 16-bit params stay whole on every device.

    `cpu_offload=True` (ZeRO-Offload, `offload_optimizer.device: "cpu"`):
      device: 2 bytes/param, the 16-bit params.
      host:   the larger of 16 bytes/param (fp32 master params 4 + Adam momentum 4 and
              variance 4 + fp32 gradients 4, the whole model's worth) and 4 bytes/param for
              each device (each process's fp32 copy of the model before partitioning;
              DeepSpeed counts every device here, not only this node's), times
              `additional_buffer_factor`.
    `cpu_offload=False`:
      device: 2 bytes/param of 16-bit params, plus this device's 1/N share of
              18 bytes/param (16-bit gradients 2 + fp32 gradients 4 + fp32 master params 4
              + Adam momentum and variance 8), rounded down.
      host:   4 bytes/param for each process on the node (its fp32 copy of the model
              before partitioning), times `additional_buffer_factor`.
    """
    _check_count("total_params", total_params, minimum=0, inclusive=False)
    _check_hardware(num_gpus_per_node, num_nodes, additional_buffer_factor)
    devices = num_nodes * num_gpus_per_node
    if cpu_offload:
        device_bytes = 2 * total_params
        host_bytes = total_params * max(4 * devices, 16) * additional_buffer_factor
    else:
        device_bytes = 2 * total_params + int(18 * total_params / devices)
        host_bytes = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(host_bytes), int(device_bytes)


def estimate_zero2_model_states_mem_needs_all_cold(total_params, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """Print DeepSpeed's ZeRO-2 table (optimizer offloaded to cpu, then none) for a model
    of `total_params` parameters; nothing is built or counted."""
    _check_count("total_params", total_params, minimum=0, inclusive=False)
    _check_hardware(num_gpus_per_node, num_nodes, additional_buffer_factor)
    print(_header(num_gpus_per_node, num_nodes)
          + f"SW: Model with {int(total_params / 1e6)}M total params.")
    print("  per CPU  |  per GPU |   Options")
    for cpu_offload in (True, False):
        host, device = estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node, num_nodes, cpu_offload, additional_buffer_factor)
        print(_row(host, device, f"offload_optimizer={_device(cpu_offload)}"))


def estimate_zero2_model_states_mem_needs_all_live(params_or_module, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """Count the params of a model (see `param_counts`) and print the ZeRO-2 table."""
    total, _ = _live_counts(params_or_module)
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node, num_nodes,
                                                   additional_buffer_factor)


# ----------------------------------------------------------------------------- ZeRO-3

def estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, num_gpus_per_node=1,
                                          num_nodes=1, cpu_offload=True, cpu_offload_params=True,
                                          zero_init=True, additional_buffer_factor=1.5):
    """(host bytes per node, device bytes per device, largest-layer bytes) for ZeRO-3.

    Stage 3 shards params too; a layer's params and gradients are whole on a device only
    while it runs: `largest_layer_memory` = 4 bytes/param of the largest layer (16-bit
    params 2 + 16-bit gradients 2), counted on every device in every case below. N is
    the number of devices, `num_nodes * num_gpus_per_node`.

    `cpu_offload` (optimizer states on the host) with `cpu_offload_params` (params too):
      device: the largest layer only.
      host:   18 bytes/param (16-bit params 2 + fp32 master params 4 + Adam momentum and
              variance 8 + fp32 gradients 4), this node's 1/num_nodes share.
    `cpu_offload` without `cpu_offload_params`:
      device: the largest layer + this device's 1/N share of the 16-bit params
              (2 bytes/param, rounded down).
      host:   16 bytes/param (the 18 less the 16-bit params), this node's share.
    With either offload, when `zero_init` is off every process first loads the whole model
    in fp32 (4 bytes/param), so the host needs the larger of that times
    `num_gpus_per_node` and the node's share above.
    No `cpu_offload` (`cpu_offload_params` is then ignored, as DeepSpeed does):
      device: the largest layer + this device's 1/N share of the same 18 bytes/param
              the full offload puts on the host (16-bit params 2 + fp32 master params 4
              + Adam states 8 + fp32 gradients 4), rounded down.
      host:   with `zero_init`, each process on the node materialises one layer at a time
              in fp32 (4 bytes/param of the largest layer); without, the whole model
              (4 bytes/param) per process.
    Host figures are multiplied by `additional_buffer_factor`; host and device bytes are
    truncated to ints, the largest-layer bytes returned as computed (an int for an int
    count), all as DeepSpeed does.
    """
    _check_zero3_counts(total_params, largest_layer_params)
    _check_hardware(num_gpus_per_node, num_nodes, additional_buffer_factor)
    devices = num_nodes * num_gpus_per_node
    node_share = 1 / num_nodes
    largest_layer_bytes = 4 * largest_layer_params

    if cpu_offload:
        if cpu_offload_params:
            host_bytes_per_param = 18
            device_bytes = largest_layer_bytes
        else:
            host_bytes_per_param = 16
            device_bytes = largest_layer_bytes + int(2 * total_params / devices)
        if zero_init:
            host_bytes = total_params * host_bytes_per_param * node_share * additional_buffer_factor
        else:
            per_param = max(4 * num_gpus_per_node, host_bytes_per_param * node_share)
            host_bytes = total_params * per_param * additional_buffer_factor
    else:
        device_bytes = largest_layer_bytes + int(18 * total_params / devices)
        loaded = largest_layer_params if zero_init else total_params
        host_bytes = loaded * 4 * num_gpus_per_node * additional_buffer_factor
    return int(host_bytes), int(device_bytes), largest_layer_bytes


def estimate_zero3_model_states_mem_needs_all_cold(total_params, largest_layer_params, num_gpus_per_node=1,
                                                   num_nodes=1, additional_buffer_factor=1.5):
    """Print DeepSpeed's ZeRO-3 table (params and optimizer offloaded to cpu or not,
    `zero_init` on and off) for a model described by its parameter counts."""
    _check_zero3_counts(total_params, largest_layer_params)
    _check_hardware(num_gpus_per_node, num_nodes, additional_buffer_factor)
    print(_header(num_gpus_per_node, num_nodes)
          + f"SW: Model with {int(total_params / 1e6)}M total params, "
            f"{int(largest_layer_params / 1e6)}M largest layer params.")
    print("  per CPU  |  per GPU |   Options")
    # Offloading params needs the optimizer offloaded too: three option sets, each with
    # zero_init on then off, six rows.
    for cpu_offload, cpu_offload_params in ((True, True), (True, False), (False, False)):
        for zero_init in (True, False):
            host, device, _ = estimate_zero3_model_states_mem_needs(
                total_params, largest_layer_params, num_gpus_per_node, num_nodes,
                cpu_offload, cpu_offload_params, zero_init, additional_buffer_factor)
            options = (f"offload_param={_device(cpu_offload_params)}, "
                       f"offload_optimizer={_device(cpu_offload)}, zero_init={int(zero_init)}")
            print(_row(host, device, options))


def estimate_zero3_model_states_mem_needs_all_live(params_or_module, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """Count the params and largest layer of a model (see `param_counts`) and print the
    ZeRO-3 table."""
    total, largest = _live_counts(params_or_module)
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node, num_nodes,
                                                   additional_buffer_factor)


# ----------------------------------------------------------------------------- counting

def param_counts(params_or_module: Any) -> tuple[int, int]:
    """(total params, largest layer's params) of an `nnx.Module` or a param pytree.

    A module counts the leaves of its `nnx.Param` state (a param shared between modules
    is one leaf there, as DeepSpeed counts a shared tensor once). A pytree (an
    `nnx.State`, a pure dict, arrays or `ShapeDtypeStruct`s) counts every leaf that has
    a shape; in an `nnx.State` only `nnx.Param` variables count.

    The largest layer is DeepSpeed's unit of ZeRO-3 gathering, which in PyTorch is one
    module's own tensors (one `Linear`'s weight for a Hugging Face Llama). Here it is the
    largest single param array, where a param of stacked layers (`StackedLayers`, run by
    `scan_layers`) counts one layer's slice: its size divided by its leading axis. A param
    is stacked when its logical axes (the `nnx.Param` sharding metadata) begin with
    "layers", or, in a pytree without that metadata, when its path passes through a key
    named "layers" (as the reference models' param trees do). For the reference Llama
    this gives the number DeepSpeed gives for the Hugging Face one: the largest of the
    embedding, the LM head and one layer's largest projection.
    """
    total = 0
    largest = 0
    for keys, shape, axes in _param_leaves(params_or_module):
        size = math.prod(shape)
        total += size
        stacked = axes[0] == "layers" if axes else "layers" in keys
        per_layer = size // shape[0] if stacked and shape and shape[0] else size
        largest = max(largest, per_layer)
    return total, largest


def _param_leaves(tree: Any):
    """(path keys, shape, logical axes or None) of every param leaf."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    if isinstance(tree, nnx.State):
        for path, var in nnx.to_flat_state(tree):
            if isinstance(var, nnx.Param):
                yield tuple(map(str, path)), tuple(var.shape), _axes(var)
        return
    is_var = lambda x: isinstance(x, nnx.Variable)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]:
        if is_var(leaf) and not isinstance(leaf, nnx.Param):
            continue
        if not hasattr(leaf, "shape"):
            raise ValueError(f"param leaf {jax.tree_util.keystr(path)} has no shape: {type(leaf).__name__}")
        keys = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        yield keys, tuple(leaf.shape), _axes(leaf) if is_var(leaf) else None


def _axes(var: nnx.Variable) -> tuple | None:
    meta = var.get_metadata()
    axes = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(axes) if axes else None


def _live_counts(params_or_module: Any) -> tuple[int, int]:
    total, largest = param_counts(params_or_module)
    if total == 0:
        raise ValueError(f"{type(params_or_module).__name__} has no params to count "
                         f"(expected an nnx.Module with nnx.Param leaves, or a pytree of arrays)")
    return total, largest


# ----------------------------------------------------------------------------- table

def _header(num_gpus_per_node: int, num_nodes: int) -> str:
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    return ("Estimated memory needed for params, optim states and gradients for a:\n"
            f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n")


def _device(offloaded: bool) -> str:
    return "cpu " if offloaded else "none"          # both four wide, so the columns line up


def _row(host_bytes: int, device_bytes: int, options: str) -> str:
    return f" {host_bytes / GiB:7.2f}GB | {device_bytes / GiB:6.2f}GB | {options}"
