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


# ----------------------------------------------------------------------------- zerojax plan

STAGES = (0, 1, 2, 3)
REMATS = ("none", "full")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

NOTES = (
    "params/grads/optimizer bytes: per device, from the shardings of the abstract state "
    "(shard shape x dtype size of every leaf)",
    "temp bytes: the compiler's memory_analysis() of the train step, compiled ahead of time "
    "on ShapeDtypeStructs (nothing allocated); gradients live inside temp",
    "total = params + optimizer + temp (device memory); host bytes: optimizer state kept in "
    "host memory under ZeRO-Offload (offload_optimizer.device cpu)",
    "micro_batch and offload: as the config sets them",
    "deepspeed_estimate: DeepSpeed's analytic model-state estimate (cpu_offload False), "
    "device bytes per device, stages 2 and 3 only; it counts no activations",
    "compiled on simulated CPU devices: XLA's CPU backend lowers a reduce-scatter to an "
    "all-reduce + slice, where a GPU would reduce-scatter, so temp may differ on a GPU",
)


def parse_bytes(text: Any) -> int:
    """'80GiB', '80 GB', '1.5TiB', '4096' -> bytes (binary units KiB..TiB, decimal KB..TB)."""
    raw = str(text).strip()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = raw[len(raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")):].lower()
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"--device-memory: expected a positive size such as 80GiB, 40GB or "
                         f"1073741824, got {raw!r}")
    return int(value * _UNITS[unit])


def plan(config: Any, devices: Any, device_memory: Any = None) -> dict:
    """Per-device memory of every candidate (ZeRO stage 0-3 x remat none/full) of a config.

    `config`: a Config, a DeepSpeed JSON dict or a path to one (its model in
    `zerojax.model`). `devices`: a device count N (the first N CPU devices) or a list of
    devices. `device_memory`: bytes per device (int) or a size string ("80GiB"); None
    means every candidate fits. Each candidate's train step is compiled ahead of time on
    abstract state; nothing is allocated. Returns the `zerojax plan --json` dict,
    candidates best first (those that fit, then the smallest total).
    """
    import numpy as np

    from zerojax.config import Config
    from zerojax.engine import initialize
    from zerojax.trainer import model_fn_from_config

    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"--devices must be an integer >= 1, got {devices}")
        available = jax.devices("cpu")
        if devices > len(available):
            raise ValueError(f"--devices {devices}: only {len(available)} CPU devices exist in this "
                             f"process (set XLA_FLAGS=--xla_force_host_platform_device_count="
                             f"{devices} before jax starts)")
        devices = available[:devices]
    else:
        devices = list(devices)
        if not devices:
            raise ValueError("--devices must be an integer >= 1, got 0 devices")
    limit = None
    if device_memory is not None:
        limit = device_memory if isinstance(device_memory, numbers.Integral) else parse_bytes(device_memory)
        if isinstance(limit, bool) or limit <= 0:
            raise ValueError(f"--device-memory must be positive, got {device_memory!r}")

    base = Config.load(config)
    n = len(devices)
    counts = None
    candidates = []
    for stage in STAGES:
        for remat in REMATS:
            cfg = base.with_overrides({"zero_optimization.stage": stage, "zerojax.remat": remat})
            model_fn, _ = model_fn_from_config(cfg)
            seq_len = int(cfg.zerojax.data.get("seq_len", 256))
            example = {"input_ids": np.zeros((1, seq_len), np.int32)}
            engine = initialize(model_fn=model_fn, config=cfg, abstract=True,
                                example_batch=example, devices=devices)
            report = engine.memory_report()
            if counts is None:
                counts = param_counts(engine._abstract_params)
            estimate = None
            if stage == 2:
                estimate = estimate_zero2_model_states_mem_needs(
                    counts[0], num_gpus_per_node=n, num_nodes=1, cpu_offload=False)[1]
            elif stage == 3:
                estimate = estimate_zero3_model_states_mem_needs(
                    counts[0], counts[1], num_gpus_per_node=n, num_nodes=1, cpu_offload=False)[1]
            candidates.append({
                "stage": stage, "micro_batch": engine.batch_sizes.micro_batch_size, "remat": remat,
                "offload": cfg.zero_optimization.offload_optimizer.device,
                "params_bytes": report["params"], "grads_bytes": report["grads"],
                "optimizer_bytes": report["optimizer"], "temp_bytes": report["temp"],
                "host_bytes": report["host"], "total_bytes": report["total"],
                "fits": limit is None or report["total"] <= limit,
                "deepspeed_estimate_bytes": estimate})
    candidates.sort(key=lambda c: (not c["fits"], c["total_bytes"], c["stage"]))
    return {"devices": n, "device_memory_bytes": limit, "candidates": candidates, "notes": list(NOTES)}


def format_plan(result: dict) -> str:
    """The table `zerojax plan` prints (MiB per device), best first, then the notes."""
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.2f}"
    limit = result.get("device_memory_bytes")
    lines = [f"devices: {result['devices']}  device memory: "
             + ("unlimited" if limit is None else f"{mib(limit)} MiB"),
             "per-device MiB, best first:",
             f"{'stage':>5} {'remat':>5} {'micro':>5} {'offload':>7} {'params':>10} {'grads':>10} "
             f"{'optimizer':>10} {'temp':>10} {'host':>10} {'total':>10} {'fits':>4} {'deepspeed':>10}"]
    for c in result["candidates"]:
        lines.append(f"{c['stage']:>5} {c['remat']:>5} {c['micro_batch']:>5} {c['offload']:>7} "
                     f"{mib(c['params_bytes']):>10} {mib(c['grads_bytes']):>10} "
                     f"{mib(c['optimizer_bytes']):>10} {mib(c['temp_bytes']):>10} "
                     f"{mib(c['host_bytes']):>10} {mib(c['total_bytes']):>10} "
                     f"{'yes' if c['fits'] else 'no':>4} {mib(c['deepspeed_estimate_bytes']):>10}")
    lines.append("how each column was obtained:")
    lines.extend(f"  - {note}" for note in result["notes"])
    return "\n".join(lines)
