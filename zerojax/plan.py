"""Memory and step-time planning: DeepSpeed's analytic estimators and `zerojax plan`.

`plan(config, devices)` (the `zerojax plan` command) lists every candidate layout of a
config - ZeRO stage x micro-batch x remat x offload - with its per-device params / grads /
optimizer / temp / host bytes, whether it fits, and a predicted step time. It compiles
the train step ahead of time on abstract state (nothing allocated), one program per
stage x remat plus one per remat for the activation bytes per row, reads the compiler's
memory analysis and the program's FLOPs, bytes and collectives (`zerojax.hlo_cost`), and
derives the micro-batch and offload columns from those programs arithmetically; each
result says how each column was obtained. `ACCELERATORS` is the one table of peak FLOP/s
and bandwidths the prediction uses.

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

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Sequence

import jax
import numpy as np
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
OFFLOADS = ("none", "optimizer", "optimizer+params")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Per-device figures the predicted step time divides by (vendors' dense peaks)."""

    name: str
    bf16_flops: float              # FLOP/s of 16-bit matmuls
    fp32_flops: float              # FLOP/s of f32 matmuls as JAX runs them by default
    hbm_bytes_per_s: float         # device memory bandwidth
    interconnect_bytes_per_s: float  # device-to-device, one direction (NVLink, TPU ICI)
    host_link_bytes_per_s: float   # device-to-host, one direction (PCIe)
    memory_bytes: int | None       # device memory (None: no limit)
    devices_per_host: int | None   # devices sharing one host's memory (None: all of them)
    source: str


# The one table. f32 matmuls: TF32 on NVIDIA (JAX's default precision there), one bf16
# pass on TPU. TPU host links are not published per chip: PCIe Gen4 x16 assumed. "cpu" is
# one simulated device of a small CPU host, for ranking runs on this kind of machine only.
ACCELERATORS = {a.name: a for a in (
    Accelerator("a100", 312e12, 156e12, 2.039e12, 300e9, 32e9, 81920 * 2**20, 8,
                "A100 SXM 80GB: NVLink 3 600 GB/s both ways, PCIe Gen4 x16"),
    Accelerator("h100", 989e12, 494e12, 3.35e12, 450e9, 64e9, 81559 * 2**20, 8,
                "H100 SXM: NVLink 4 900 GB/s both ways, PCIe Gen5 x16"),
    Accelerator("h200", 989e12, 494e12, 4.8e12, 450e9, 64e9, 143771 * 2**20, 8,
                "H200 SXM: NVLink 4 900 GB/s both ways, PCIe Gen5 x16"),
    Accelerator("v5e", 197e12, 197e12, 819e9, 200e9, 32e9, 16 * 2**30, 8,
                "TPU v5e: ICI 1600 Gbit/s per chip, host link assumed PCIe Gen4 x16"),
    Accelerator("v5p", 459e12, 459e12, 2.765e12, 600e9, 32e9, 95 * 2**30, 4,
                "TPU v5p: ICI 4800 Gbit/s per chip, host link assumed PCIe Gen4 x16"),
    Accelerator("cpu", 5e10, 5e10, 1e10, 1e10, 1e10, None, None,
                "one simulated device of a 2-core CPU host (rough; for ranking only)"),
)}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: Any, flag: str = "--device-memory") -> int:
    """'80GiB', '80 GB', '1.5TiB', '4096' -> bytes (binary units KiB..TiB, decimal KB..TB)."""
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"{flag} must be positive, got {text}")
        return int(text)
    raw = str(text).strip()
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    number = raw.rstrip(letters).strip()
    unit = raw[len(raw.rstrip(letters)):].lower()
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{flag}: expected a positive size such as 80GiB, 40GB or "
                         f"1073741824, got {raw!r}")
    return int(value * _UNITS[unit])


def accelerator_named(name: str) -> Accelerator:
    key = str(name).strip().lower()
    if key not in ACCELERATORS:
        raise ValueError(f"--accelerator: unknown {name!r}; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[key]


def accelerator_of(device) -> Accelerator | None:
    """The table's row for a live device (by its device_kind), or None."""
    if device.platform == "cpu":
        return ACCELERATORS["cpu"]
    kind = device.device_kind.lower()
    for needle, name in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"),
                         ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("tpu v5", "v5p")):
        if needle in kind:
            return ACCELERATORS[name]
    return None


def micro_batch_sizes(rows: int, configured: int) -> list[int]:
    """Powers of two that divide the rows one data rank takes per step, and the config's own."""
    sizes = {1 << k for k in range(rows.bit_length()) if rows % (1 << k) == 0}
    return sorted(sizes | {configured})


def candidate_overrides(stage: int, remat: str | None, micro_batch: int, gas: int, offload: str,
                        train_batch_size: int) -> dict:
    """The DeepSpeed keys (dotted) that make a config one candidate; None removes a key."""
    host = {"device": "cpu", "pin_memory": True}
    out = {"train_batch_size": train_batch_size, "train_micro_batch_size_per_gpu": micro_batch,
           "gradient_accumulation_steps": gas, "zero_optimization.stage": stage,
           "zero_optimization.offload_optimizer": host if offload != "none" else None,
           "zero_optimization.offload_param": host if offload == "optimizer+params" else None}
    if remat is not None:
        out["zerojax.remat"] = remat
    return out


@dataclasses.dataclass
class _Program:
    """What one compile (or, without compiling, the shardings) tells about a stage x remat."""

    params: int
    grads: int
    optimizer: int
    counts: tuple[int, int]
    temp: int | None = None
    cost: Any = None               # hlo_cost.Cost of the whole step
    micro_loop: Any = None         # hlo_cost.Cost of the micro-batch loop (gas > 1), else None
    gas: int = 1
    xla_flops: float | None = None
    optimizer_layer: int = 0       # optimizer bytes a layer-streamed update holds at once
    streamed: bool = False         # the engine streams an offloaded update layer by layer


def _per_device(tree: Any, shardings: Any) -> int:
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _per_layer(tree: Any, shardings: Any) -> int:
    """Per-device bytes of a tree with each layer-stacked leaf (a path through "layers")
    counted for one layer: what a streamed update holds at once."""
    total = 0
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings)):
        shard = s.shard_shape(x.shape)
        size = math.prod(shard) * np.dtype(x.dtype).itemsize
        stacked = shard and any(getattr(k, "key", None) == "layers" for k in path)
        total += size // shard[0] if stacked and shard[0] else size
    return total


def _program(base, devices, stage, remat, micro, rows, batch_rows, compile) -> _Program:
    """Build one candidate's engine on abstract state; compile its train step unless told not to."""
    from zerojax import hlo_cost, offload
    from zerojax.engine import initialize
    from zerojax.trainer import model_fn_from_config

    cfg = base.with_overrides(candidate_overrides(stage, remat, micro, rows // micro, "none", batch_rows))
    model_fn, _ = model_fn_from_config(cfg)
    seq_len = int(cfg.zerojax.data.get("seq_len", 256))
    engine = initialize(model_fn=model_fn, config=cfg, abstract=True, devices=devices,
                        example_batch={"input_ids": np.zeros((1, seq_len), np.int32)})
    params = engine.state.params                    # ShapeDtypeStructs laid out as stored
    program = _Program(
        params=_per_device(params, engine.state_shardings.params),
        grads=_per_device(params, engine.layout.shardings(engine.layout.grads)),
        optimizer=_per_device(engine.state.opt_state, engine.state_shardings.opt_state),
        counts=param_counts(params), gas=rows // micro,
        optimizer_layer=_per_layer(engine.state.opt_state, engine.state_shardings.opt_state),
        streamed=cfg.optimizer is not None and cfg.optimizer.type in offload.ELEMENTWISE_OPTIMIZERS)
    if not compile:
        return program
    compiled = engine.lower_train_step().compile(**_compile_options())
    program.temp = int(compiled.memory_analysis().temp_size_in_bytes)
    analysis = hlo_cost.analyze(compiled.as_text(), len(devices))
    program.cost = analysis.total
    if program.gas > 1:
        program.micro_loop = hlo_cost.Cost()
        for loop in analysis.top_loops:
            if loop.trip_count == program.gas:
                program.micro_loop.add(loop.cost)
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    program.xla_flops = (xla or {}).get("flops")
    return program


def _compile_options() -> dict:
    """A planned program never runs: skip LLVM's optimisation of its machine code (about half
    of a compile; the HLO, buffer assignment and memory analysis are the same at any level),
    unless XLA_FLAGS already chose a level."""
    if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {"compiler_options": {"xla_backend_optimization_level": 0}}


_PROGRAMS: dict[tuple, _Program] = {}


def _cached_program(base, devices, stage, remat, micro, rows, batch_rows, compile) -> _Program:
    """`_program`, remembered for this process: planning the same config again (another
    device or host memory, accelerator, `zerojax autotune` after `zerojax plan`) compiles
    nothing twice."""
    settings = {k: v for k, v in base.to_dict().items() if k != "autotuning"}     # no part of a program
    key = (json.dumps(settings, sort_keys=True, default=repr),
           tuple((d.platform, d.id) for d in devices), stage, remat, micro, rows, batch_rows, compile)
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= 64:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = _program(base, devices, stage, remat, micro, rows, batch_rows, compile)
    return _PROGRAMS[key]


def _devices(devices: Any) -> list:
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"--devices must be an integer >= 1, got {devices}")
        available = jax.devices("cpu")
        if devices > len(available):
            raise ValueError(f"--devices {devices}: only {len(available)} CPU devices exist in this "
                             f"process (set XLA_FLAGS=--xla_force_host_platform_device_count="
                             f"{devices} before jax starts)")
        return available[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("--devices must be an integer >= 1, got 0 devices")
    return devices


def _estimate(stage: int, offload: str, counts: tuple[int, int], n: int) -> int | None:
    """DeepSpeed's analytic device bytes per device for a candidate (stages 2 and 3)."""
    total, largest = counts
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(total, n, 1, cpu_offload=offload != "none")[1]
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(
            total, largest, n, 1, cpu_offload=offload != "none",
            cpu_offload_params=offload == "optimizer+params")[1]
    return None


def plan(config: Any, devices: Any, device_memory: Any = None, *, host_memory: Any = None,
         accelerator: str = "h100", compile: bool = True, stages: Sequence[int] = STAGES,
         remats: Sequence[str] = REMATS) -> dict:
    """Every candidate (ZeRO stage x micro-batch x remat x offload) of a config, best first.

    `config`: a Config, a DeepSpeed JSON dict or a path (its model in `zerojax.model`).
    `devices`: a count N (the first N CPU devices, simulated) or a list of devices.
    `device_memory` / `host_memory`: bytes (int) or sizes ("80GiB"); device memory defaults
    to the accelerator's, host memory (per host) to no limit. `accelerator`: a row of
    `ACCELERATORS`, whose figures turn the compiled program's FLOPs and bytes into a
    predicted step time. With `compile=False` nothing is compiled: the state columns come
    from the shardings alone, and temp and step time are None. `stages` and `remats`
    narrow the candidates (autotuning's `zero_optimization.stage` list). Returns the
    `zerojax plan --json` dict; the notes say how each column was obtained.
    """
    from zerojax.config import Config, ConfigError
    from zerojax.mesh import build_mesh, data_parallel_size
    from zerojax.trainer import model_fn_from_config

    accel = accelerator_named(accelerator)
    device_limit = parse_bytes(device_memory) if device_memory is not None else accel.memory_bytes
    host_limit = parse_bytes(host_memory, "--host-memory") if host_memory is not None else None
    devices = _devices(devices)
    base = Config.load(config)
    model_fn_from_config(base)                 # a bad model section fails once, before any layout
    n = len(devices)
    dp = data_parallel_size(build_mesh(base, devices))
    sizes = base.resolve_batch(dp)
    batch_rows, rows = sizes.train_batch_size, sizes.train_batch_size // dp
    sixteen_bit = base.bf16.enabled or base.fp16.enabled
    per_host = min(accel.devices_per_host or n, n)

    stages, remats = tuple(stages), tuple(remats)
    if not stages or any(s not in STAGES for s in stages):
        raise ValueError(f"stages: expected ZeRO stages from {list(STAGES)}, got {list(stages)}")
    if not remats or any(r not in REMATS for r in remats):
        raise ValueError(f"remats: expected modes from {list(REMATS)}, got {list(remats)}")
    if compile:
        micros = micro_batch_sizes(rows, sizes.micro_batch_size)
    else:
        micros, remats = [sizes.micro_batch_size], (None,)
    m0 = micros[0]
    m1 = micros[-1] if len(micros) > 1 else None
    slope_stage = base.zero_optimization.stage
    # One program per stage x remat at the smallest micro-batch; with more than one size,
    # one more per remat at the largest, at the config's own stage (the first planned
    # stage if the config's is not planned): the activation bytes per row, which the sizes
    # in between interpolate.
    slope_stage = slope_stage if slope_stage in stages else stages[0]
    jobs = {(stage, remat, m0): (stage, remat, m0) for stage in stages for remat in remats}
    if compile and m1 is not None:
        jobs.update({("slope", remat, m1): (slope_stage, remat, m1) for remat in remats})
    done, notes = {}, []
    for key, (stage, remat, micro) in jobs.items():
        try:
            done[key] = _cached_program(base, devices, stage, remat, micro, rows, batch_rows, compile)
        except ConfigError as e:               # one impossible layout does not end the plan
            if key[0] != "slope":
                notes.append(f"stage {stage}" + (f" remat {remat}" if remat else "") + f": not planned: {e}")
    programs = {(stage, remat): done[stage, remat, m0] for stage in stages for remat in remats
                if (stage, remat, m0) in done}
    if not programs:
        raise ConfigError("no candidate could be planned: " + "; ".join(notes))
    slopes = {remat: (done["slope", remat, m1].temp - programs[slope_stage, remat].temp) / (m1 - m0)
              for remat in remats if ("slope", remat, m1) in done and (slope_stage, remat) in programs}

    candidates = []
    for (stage, remat), prog in programs.items():
        for micro in micros:
            if micro != m0 and remat not in slopes:
                continue
            gas = rows // micro
            temp = None if prog.temp is None else int(prog.temp + (micro - m0) * slopes.get(remat, 0.0))
            for offload in OFFLOADS:
                if (offload == "optimizer" and stage < 1) or (offload == "optimizer+params" and stage < 3):
                    continue
                candidates.append(_candidate(prog, stage, remat, micro, gas, offload, temp, accel,
                                             sixteen_bit, device_limit, host_limit, per_host, n))
    inf = float("inf")
    candidates.sort(key=lambda c: (not c["fits"], inf if c["step_seconds"] is None else c["step_seconds"],
                                   c["total_bytes"], c["stage"], OFFLOADS.index(c["offload"]), c["micro_batch"]))
    notes = _notes(accel, compile, devices, programs, base, m0, m1, rows, dp, batch_rows,
                   slopes, slope_stage, sixteen_bit, device_limit, host_limit, per_host) + notes
    counts = next(iter(programs.values())).counts
    return {"devices": n, "accelerator": accel.name, "device_memory_bytes": device_limit,
            "host_memory_bytes": host_limit, "train_batch_size": batch_rows, "data_parallel": dp,
            "params": counts[0], "largest_layer_params": counts[1], "compiled": compile,
            "programs_compiled": len(done) if compile else 0, "candidates": candidates, "notes": notes}


def _candidate(prog: _Program, stage, remat, micro, gas, offload, temp, accel, sixteen_bit,
               device_limit, host_limit, per_host, n) -> dict:
    # ZeRO-Offload as the engine does it: the offloaded state lives on the host between
    # steps. The step copies the params to the device at its start (live all step); the
    # update brings the optimizer state (and reads the params again) one layer at a time
    # for an element-wise optimizer, else whole, with the gradients live; the new values
    # go back. Under bf16/fp16 the fp32 master params follow the optimizer; offload_param
    # moves them in any precision.
    moved_optimizer = prog.optimizer if offload != "none" else 0
    moved_params = prog.params if offload == "optimizer+params" or (offload != "none" and sixteen_bit) else 0
    params, optimizer = prog.params - moved_params, prog.optimizer - moved_optimizer
    host = moved_optimizer + moved_params
    transfer = 2 * moved_optimizer + (3 if prog.streamed else 2) * moved_params
    if temp is not None and offload != "none":
        in_update = prog.optimizer_layer if prog.streamed else moved_optimizer
        temp = moved_params + max(temp, prog.grads + in_update)
    total = params + optimizer + (moved_params if temp is None else temp)
    fits = ((device_limit is None or total <= device_limit)
            and (host_limit is None or host * per_host <= host_limit))
    row = {"stage": stage, "micro_batch": micro, "gradient_accumulation_steps": gas, "remat": remat,
           "offload": offload, "params_bytes": params, "grads_bytes": prog.grads,
           "optimizer_bytes": optimizer, "temp_bytes": temp, "host_bytes": host, "total_bytes": total,
           "fits": fits, "step_seconds": None, "host_transfer_bytes": transfer,
           "deepspeed_estimate_bytes": _estimate(stage, offload, prog.counts, n)}
    if prog.cost is not None:
        row.update(_predict(prog, gas, transfer, accel, sixteen_bit))
    return row


def _predict(prog: _Program, gas: int, transfer: int, accel: Accelerator, sixteen_bit: bool) -> dict:
    """Roofline step time; collectives in the micro-batch loop scale with gas, no overlap assumed."""
    collective, wire = dict(prog.cost.collective_bytes), dict(prog.cost.wire_bytes)
    if prog.micro_loop is not None:
        scale = gas / prog.gas - 1.0
        for mine, loop in ((collective, prog.micro_loop.collective_bytes), (wire, prog.micro_loop.wire_bytes)):
            for kind, value in loop.items():
                mine[kind] = mine.get(kind, 0.0) + scale * value
    compute_s = prog.cost.flops / (accel.bf16_flops if sixteen_bit else accel.fp32_flops)
    memory_s = prog.cost.bytes / accel.hbm_bytes_per_s
    collective_s = sum(wire.values()) / accel.interconnect_bytes_per_s
    host_s = transfer / accel.host_link_bytes_per_s
    return {"step_seconds": max(compute_s, memory_s) + collective_s + host_s,
            "flops": prog.cost.flops, "hbm_bytes": int(prog.cost.bytes),
            "collective_bytes": {k: int(v) for k, v in sorted(collective.items())},
            "collective_wire_bytes": int(sum(wire.values())),
            "seconds": {"compute": compute_s, "memory": memory_s, "collective": collective_s,
                        "host_link": host_s}}


def _size(b: float | None) -> str:
    if b is None:
        return "no limit"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{int(b)} B"


def _notes(accel, compile, devices, programs, base, m0, m1, rows, dp, batch_rows, slopes, slope_stage,
           sixteen_bit, device_limit, host_limit, per_host) -> list[str]:
    notes = [
        f"accelerator {accel.name} ({accel.source}): {accel.bf16_flops / 1e12:g} TFLOP/s bf16, "
        f"{accel.fp32_flops / 1e12:g} f32, HBM {accel.hbm_bytes_per_s / 1e9:g} GB/s, interconnect "
        f"{accel.interconnect_bytes_per_s / 1e9:g} GB/s, host link {accel.host_link_bytes_per_s / 1e9:g} GB/s "
        f"per device (zerojax.plan.ACCELERATORS)",
        "params/grads/optimizer bytes: per device, from the shardings of the abstract state (shard "
        "shape x dtype size of every leaf); params are the fp32 master params (16-bit copies are made "
        "per layer inside the step); gradients live inside temp and are listed for reference",
        f"fits: params + optimizer + temp <= device memory ({_size(device_limit)}), and host bytes x "
        f"{per_host} devices per host <= host memory ({_size(host_limit)})",
        "offload 'optimizer' (zero_optimization.offload_optimizer cpu, stages 1-3) and "
        "'optimizer+params' (offload_param cpu too, stage 3): derived from the non-offloaded program, "
        "not compiled. Between steps the optimizer state, and the params with offload_param"
        + (" or under bf16/fp16 (the fp32 master params follow the optimizer)" if sixteen_bit else "")
        + ", live on the host (host_bytes, per device). As the engine runs it, the step copies the "
        "params to the device at its start and the update streams the optimizer state (and the params "
        "again) through the device one layer at a time (element-wise optimizers; others move it whole), "
        "new values going back: host_transfer_bytes = 2 x optimizer + 3 x params (2 x unstreamed) over "
        "the host link per step, and temp = moved params (live all step) + max(compiled temp, grads + "
        "one layer's optimizer state (or all of it, unstreamed)); a GPU run measures what XLA's "
        "host-offload scheduling really keeps",
        "deepspeed_estimate: DeepSpeed's analytic model-state bytes per device "
        "(estimate_zero2/zero3_model_states_mem_needs with the candidate's offload flags), stages 2 "
        "and 3; it counts 16-bit params and no activations",
    ]
    if not compile:
        notes.append("not compiled (--no-compile): temp, step_seconds and the columns only they "
                     "depend on (micro-batch and remat, shown as the config's / null) are not "
                     "computed; total and fits count params + optimizer only (and the params an "
                     "offload copies to the device for the step)")
        return notes
    notes += [
        f"micro_batch: train_batch_size {batch_rows} = micro_batch x gradient_accumulation_steps x "
        f"data-parallel {dp} held fixed, so micro_batch runs over the powers of two dividing {rows}",
        f"temp: the compiler's memory_analysis() of the train step, compiled ahead of time on "
        f"ShapeDtypeStructs (nothing allocated; LLVM optimisation off, which changes no buffer) at "
        f"micro_batch {m0}, one program per ZeRO stage x remat ({len(programs)} programs)"
        + (f"; other micro-batch sizes add (micro_batch - {m0}) x the activation bytes per row "
           f"measured by one more program per remat at micro_batch {m1}, ZeRO stage {slope_stage} "
           f"(exact at both ends there, interpolated in between and at other stages)"
           if slopes else ""),
        "step_seconds = max(FLOPs / peak, HBM bytes / HBM bandwidth) + collective bytes on the wire / "
        "interconnect + host_transfer_bytes / host link (no overlap assumed), per device. FLOPs: "
        "2 x M x N x K of every dot in the optimized HLO; HBM bytes: operands + results of every "
        "unfused instruction; both with loop bodies times their trip counts (zerojax.hlo_cost)"
        + _xla_note(programs) + ". Collectives (all-gather, reduce-scatter, all-reduce, all-to-all, "
        "collective-permute) from the HLO's operand/result sizes at ring cost over their replica "
        "groups; those inside the micro-batch loop scale with gradient_accumulation_steps, FLOPs and "
        "HBM bytes are held (the same rows per step)",
    ]
    if devices[0].platform == "cpu":
        notes.append("compiled on simulated CPU devices: XLA's CPU backend lowers ZeRO's gradient "
                     "reduce-scatter as an all-reduce + dynamic-slice (a GPU reduce-scatters: about half "
                     "the bytes on the wire) and runs bf16 matmuls in f32 (larger temp and f32 "
                     "collectives of their outputs); the prediction counts the program as compiled here")
    return notes


def _xla_note(programs: dict) -> str:
    prog = next((p for p in programs.values() if p.xla_flops), None)
    if prog is None:
        return ""
    return (f" (XLA's own compiled.cost_analysis() counts each loop body once: {prog.xla_flops:.3g} "
            f"FLOPs where the trip counts give {prog.cost.flops:.3g} for the first program)")


def format_plan(result: dict) -> str:
    """The table `zerojax plan` prints, best first, then how each column was obtained."""
    rows = result["candidates"]
    biggest = max([c["total_bytes"] for c in rows] + [1])
    unit, scale = ("GiB", 2**30) if biggest >= 2**30 else ("MiB", 2**20)
    size = lambda b: "-" if b is None else f"{b / scale:,.2f}"
    count = result["params"]
    count = f"{count / 1e9:.3g}B" if count >= 1e9 else f"{count / 1e6:.3g}M"
    lines = [f"model: {count} params; devices: {result['devices']} (data-parallel "
             f"{result['data_parallel']}), accelerator "
             f"{result['accelerator']}, device memory {_size(result['device_memory_bytes'])}, host memory "
             f"{_size(result['host_memory_bytes'])} per host, train_batch_size {result['train_batch_size']}",
             f"per-device {unit}, best first ({len(rows)} candidates from {result['programs_compiled']} "
             f"compiled programs):",
             f"{'stage':>5} {'remat':>5} {'micro':>5} {'gas':>4} {'offload':>16} {'params':>9} {'grads':>9} "
             f"{'optimizer':>9} {'temp':>9} {'host':>9} {'total':>9} {'fits':>4} {'step s':>9} {'deepspeed':>9}"]
    for c in rows:
        step = "-" if c["step_seconds"] is None else f"{c['step_seconds']:.3g}"
        lines.append(f"{c['stage']:>5} {c['remat'] or '-':>5} {c['micro_batch']:>5} "
                     f"{c['gradient_accumulation_steps']:>4} {c['offload']:>16} {size(c['params_bytes']):>9} "
                     f"{size(c['grads_bytes']):>9} {size(c['optimizer_bytes']):>9} {size(c['temp_bytes']):>9} "
                     f"{size(c['host_bytes']):>9} {size(c['total_bytes']):>9} {'yes' if c['fits'] else 'no':>4} "
                     f"{step:>9} {size(c['deepspeed_estimate_bytes']):>9}")
    lines.append("how each column was obtained:")
    lines.extend(f"  - {note}" for note in result["notes"])
    return "\n".join(lines)
