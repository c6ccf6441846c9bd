"""The typed zerojax config, parsed from a DeepSpeed-style JSON dict.

DeepSpeed's keys keep DeepSpeed's meaning and defaults. zerojax-only settings live under
the single key ``"zerojax"``. Parsing checks everything that can be checked without
devices: unknown keys (with a "did you mean" suggestion), types and ranges, each reported
with its full key path. The batch-size triple needs the data-parallel size and is
resolved later by :meth:`Config.resolve_batch`.

Schema (defaults in parentheses; DeepSpeed's docs describe the DeepSpeed keys)::

    train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps (None)
    optimizer {type: adam|adamw|sgd|lamb|lion|adagrad (any case), params {...}}  (None)
    scheduler {type: WarmupLR|WarmupDecayLR|WarmupCosineLR|OneCycle|LRRangeTest, params}  (None)
    fp16 {enabled false, loss_scale 0 (= dynamic), initial_scale_power 16,
          loss_scale_window 1000, hysteresis 2, consecutive_hysteresis false,
          min_loss_scale 1, auto_cast false}
    bf16 {enabled false}                     (old name "bfloat16" accepted)
    gradient_clipping (1.0, DeepSpeed's code default; 0 disables)
    zero_optimization {stage 0, stage3_param_persistence_threshold 100000, sub_group_size 1e9,
                       reduce_bucket_size 5e8, allgather_bucket_size 5e8, stage3_prefetch_bucket_size 5e7,
                       stage3_max_live_parameters 1e9 (the bucketed collectives' sizes),
                       offload_optimizer {device none|cpu|nvme, pin_memory false, ratio 1,
                                          nvme_path (required with nvme), buffer_count 4,
                                          pipeline_read false, pipeline_write false, fast_init false},
                       offload_param {device none|cpu (stage 3), pin_memory false}}
    steps_per_print (None)
    tensor_parallel {autotp_size 1}, sequence_parallel_size (1)
    pipeline {stages "auto", partition "best", schedule "1f1b"|"gpipe"|"interleaved",
              activation_checkpoint_interval 0, seed_layers, pipe_partitioned, grad_partitioned}
    activation_checkpointing {partition_activations, cpu_checkpointing, ...}
    aio {block_size 1048576, thread_count 1 (or intra_op_parallelism): NVMe offload's I/O}
    autotuning {enabled false, fast true, metric throughput|latency|flops, results_dir, exps_dir,
                start_profile_step 3, end_profile_step 5, tuner_type gridsearch|random|model_based,
                tuner_num_trials 50, tuner_early_stopping 5, ...}: read by `zerojax autotune`
    zerojax {mesh {data -1, sequence 1, tensor 1, pipe 1, replica 1},
             kernels "auto"|"xla"|"pallas", collectives "auto"|"xla"|"bucketed" ("auto":
             bucketed for multi-process CPU runs on a data-only mesh; in one CPU process
             ZeRO-3's params gathered once per step), remat "auto"|"full"|"minimal"|"none"
             ("auto": full where ZeRO-3 gathers per layer or with an activation_checkpointing
             section, else minimal on CPU and none elsewhere),
             weight_decay_mask "all"|"no_bias_norm", sequence_parallel {strategy "ulysses"|"ring"},
             model {}, data {}, train {} (free-form), compilation_cache (None), seed 0}

DeepSpeed keys that XLA makes unnecessary (bucket sizes, overlap_comm, ...) are accepted
silently. DeepSpeed features zerojax does not implement yet are accepted with an
:class:`UnsupportedKeyWarning` when they are switched on.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import operator
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A config that zerojax cannot run; the message names the key path and a fix."""


class UnsupportedKeyWarning(UserWarning):
    """A real DeepSpeed key that zerojax accepts but does not implement (yet)."""


# ---------------------------------------------------------------------------------------
# sections

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    type: str                        # canonical lowercase: adam, adamw, sgd, lamb, lion, adagrad
    params: dict[str, Any]           # DeepSpeed names, defaults filled in


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    type: str                        # WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest
    params: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FP16Config:
    enabled: bool = False
    loss_scale: float = 0.0          # 0: dynamic; > 0: static scale
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    auto_cast: bool = False


@dataclasses.dataclass(frozen=True)
class BF16Config:
    enabled: bool = False


@dataclasses.dataclass(frozen=True)
class OffloadOptimizerConfig:
    """DeepSpeed's `zero_optimization.offload_optimizer` (ZeRO-Offload, ZeRO-Infinity)."""

    device: str = "none"             # "none" | "cpu" (host memory) | "nvme" (files: zerojax.nvme)
    pin_memory: bool = False         # True: pinned (page-locked) host memory, as DeepSpeed
    ratio: float = 1.0               # share of the state offloaded; only 1.0 is implemented
    nvme_path: str | None = None     # nvme: the directory of the state files (created if missing)
    buffer_count: int = 4            # nvme: sub-groups' state held in host RAM at most
    pipeline_read: bool = False      # nvme: read the next sub-groups during an update
    pipeline_write: bool = False     # nvme: write a sub-group during the next update
    fast_init: bool = False          # nvme: zerojax always writes the initial state directly

    @property
    def enabled(self) -> bool:
        """The state lives in host memory (device "cpu"); "nvme" is `zerojax.nvme`'s."""
        return self.device == "cpu"


@dataclasses.dataclass(frozen=True)
class OffloadParamConfig:
    """DeepSpeed's `zero_optimization.offload_param` (ZeRO-3 params in host memory)."""

    device: str = "none"             # "none" | "cpu" (host memory)
    pin_memory: bool = False         # True: pinned (page-locked) host memory, as DeepSpeed

    @property
    def enabled(self) -> bool:
        return self.device == "cpu"


@dataclasses.dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    stage3_param_persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000    # elements per NVMe optimizer update (DeepSpeed's 1e9)
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    offload_optimizer: OffloadOptimizerConfig = OffloadOptimizerConfig()
    offload_param: OffloadParamConfig = OffloadParamConfig()


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    stages: int | str = "auto"
    partition: str = "best"
    schedule: str = "1f1b"
    activation_checkpoint_interval: int = 0
    seed_layers: bool = False
    pipe_partitioned: bool = True
    grad_partitioned: bool = True


@dataclasses.dataclass(frozen=True)
class ActivationCheckpointingConfig:
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1                   # -1: every device the other axes leave
    sequence: int = 1
    tensor: int = 1
    pipe: int = 1
    replica: int = 1


@dataclasses.dataclass(frozen=True)
class SequenceParallelConfig:
    strategy: str = "ulysses"


# Activations the reference models name (jax.ad_checkpoint.checkpoint_name) inside a
# transformer layer, so a remat policy can save, offload or recompute each by name.
REMAT_NAMES = ("layer_input", "query", "key", "value", "attention", "attention_out",
               "mlp_gate", "mlp_up", "mlp_hidden", "mlp_out")
# The named matmul outputs: what a RematPolicy's "minimal" base keeps.
REMAT_MATMUL_NAMES = ("query", "key", "value", "attention_out", "mlp_gate", "mlp_up", "mlp_out")


@dataclasses.dataclass(frozen=True)
class RematPolicy:
    """`"zerojax": {"remat": {...}}`: a base mode plus per-tensor choices by name.

    Inside each layer, the named activations in `save` are kept for the backward pass, those
    in `offload` are kept in host memory (and copied back for the backward pass), those in
    `remat` are recomputed. The rest follow `policy`: "full" recomputes them; "minimal"
    keeps the named matmul outputs (REMAT_MATMUL_NAMES) and recomputes everything else;
    "none" keeps everything (so it takes no `remat` names: nothing would be recomputed)."""

    policy: str = "full"
    save: tuple[str, ...] = ()
    offload: tuple[str, ...] = ()
    remat: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ZeroJaxConfig:
    mesh: MeshConfig = MeshConfig()
    kernels: str = "auto"
    collectives: str = "auto"
    remat: str | RematPolicy = "auto"
    weight_decay_mask: str = "all"
    sequence_parallel: SequenceParallelConfig = SequenceParallelConfig()
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    rlhf: dict[str, Any] = dataclasses.field(default_factory=dict)
    compilation_cache: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class AioConfig:
    """DeepSpeed's `aio` section, for NVMe offload's file I/O (zerojax.nvme)."""
    block_size: int = 1_048_576      # bytes per read/write call
    thread_count: int = 1            # I/O threads (DeepSpeed's older name)
    intra_op_parallelism: int = 1    # I/O threads (DeepSpeed's newer name); the larger one is used


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """DeepSpeed's `tensorboard` / `csv_monitor` sections."""
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


@dataclasses.dataclass(frozen=True)
class AutotuningConfig:
    """DeepSpeed's `autotuning` section, read by `zerojax autotune` (zerojax.autotune)."""
    enabled: bool = False
    fast: bool = True                        # time the planner's best few (else up to tuner_num_trials)
    metric: str = "throughput"               # "throughput" | "latency" | "flops"
    results_dir: str = "autotuning_results"  # ds_config_optimal.json, summary.txt
    exps_dir: str = "autotuning_exps"        # one directory per timed experiment
    overwrite: bool = True                   # False: reuse an experiment's earlier result
    start_profile_step: int = 3              # steps run before timing starts
    end_profile_step: int = 5                # the step timing ends after
    tuner_type: str = "gridsearch"           # "gridsearch" | "random" | "model_based"
    tuner_early_stopping: int = 5            # trials without a better metric before stopping
    tuner_num_trials: int = 50
    min_train_micro_batch_size_per_gpu: int = 1
    max_train_micro_batch_size_per_gpu: int = 1024
    num_tuning_micro_batch_sizes: int = 3    # micro-batch sizes timed per layout, largest first


@dataclasses.dataclass(frozen=True)
class BatchSizes:
    train_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int


# ---------------------------------------------------------------------------------------
# value parsers: each takes (value, path) and returns the parsed value or raises

Parser = Callable[[Any, str], Any]

_AUTO_MESSAGE = ('{path}: got "auto"; "auto" is filled in by the Hugging Face Trainer '
                 'integration from its own arguments and must be a number here')


def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {value!r}")


def _reject_auto(value: Any, path: str) -> None:
    if isinstance(value, str) and value.strip().lower() == "auto":
        raise ConfigError(_AUTO_MESSAGE.format(path=path))


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" {lo}-{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _int(lo: int | None = None, hi: int | None = None) -> Parser:
    def parse(value, path):
        _reject_auto(value, path)
        expected = "an integer" + _range_text(lo, hi)
        if isinstance(value, bool):
            raise _fail(path, expected, value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)      # JSON writes 5e8 as a float
        if not isinstance(value, int):
            raise _fail(path, expected, value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _fail(path, expected, value)
        return value
    return parse


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False) -> Parser:
    def parse(value, path):
        _reject_auto(value, path)
        lo_text = "" if lo is None else (f" > {lo:g}" if lo_open else f" >= {lo:g}")
        hi_text = "" if hi is None else (f" < {hi:g}" if hi_open else f" <= {hi:g}")
        expected = "a number" + (lo_text + ("," if lo_text and hi_text else "") + hi_text)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(path, expected, value)
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise _fail(path, expected, value)
        if hi is not None and (value >= hi if hi_open else value > hi):
            raise _fail(path, expected, value)
        return float(value)
    return parse


def _bool(value, path):
    _reject_auto(value, path)
    if not isinstance(value, bool):
        raise _fail(path, "true or false", value)
    return value


def _choice(*options: str) -> Parser:
    def parse(value, path):
        if not isinstance(value, str) or value not in options:
            raise _fail(path, "one of " + ", ".join(repr(o) for o in options), value)
        return value
    return parse


def _optional(parser: Parser) -> Parser:
    return lambda value, path: None if value is None else parser(value, path)


def _str(value, path):
    if not isinstance(value, str):
        raise _fail(path, "a string", value)
    return value


def _free_dict(value, path):
    if not isinstance(value, Mapping):
        raise _fail(path, "an object", value)
    return copy.deepcopy(dict(value))


def _betas() -> Parser:
    def parse(value, path):
        _reject_auto(value, path)
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise _fail(path, "a list of two numbers in [0, 1)", value)
        return [_num(0.0, 1.0, hi_open=True)(b, f"{path}[{i}]") for i, b in enumerate(value)]
    return parse


def _stages(value, path):
    if value == "auto":
        return value
    return _int(1)(value, path)


# ---------------------------------------------------------------------------------------
# key checking


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _warn(message: str, category: type[Warning]) -> None:
    """Warn at the caller's line: the first frame outside this module."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _is_active(value: Any) -> bool:
    """Whether an unimplemented DeepSpeed key asks for something (not off / default)."""
    if value is None or value is False or value == {} or value == []:
        return False
    if isinstance(value, Mapping) and value.get("enabled", True) is False:
        return False
    return True


def _check_keys(raw: Mapping, path: str, known: set[str], *, noop: set[str] = frozenset(),
                unsupported: Mapping[str, Callable[[Any], bool]] | None = None) -> None:
    """Unknown keys: error with a suggestion; DeepSpeed keys we don't implement: warn."""
    unsupported = unsupported or {}
    for key in raw:
        key_path = _join(path, key)
        if not isinstance(key, str):
            raise ConfigError(f"{key_path}: keys must be strings")
        if key in known or key in noop:
            continue
        if key in unsupported:
            if unsupported[key](raw[key]):
                _warn(f"{key_path}: DeepSpeed's '{key}' is not implemented in zerojax yet; "
                      "the key is ignored", UnsupportedKeyWarning)
            continue
        candidates = sorted(known | set(noop) | set(unsupported))
        close = difflib.get_close_matches(key, candidates, n=1)
        if close:
            hint = _join(path, close[0])
            raise ConfigError(f"unknown key '{key_path}'; did you mean '{hint}'?")
        raise ConfigError(f"unknown key '{key_path}'; known keys: {', '.join(sorted(known))}")


def _section(raw: Any, path: str, schema: Mapping[str, tuple[Parser, Any]], *,
             noop: set[str] = frozenset(),
             unsupported: Mapping[str, Callable[[Any], bool]] | None = None) -> dict[str, Any]:
    """Parse one JSON object against `schema` (key -> (parser, default))."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _fail(path, "an object", raw)
    _check_keys(raw, path, set(schema), noop=noop, unsupported=unsupported)
    out = {}
    for key, (parse, default) in schema.items():
        out[key] = parse(raw[key], _join(path, key)) if key in raw else copy.deepcopy(default)
    return out


# ---------------------------------------------------------------------------------------
# optimizer

_LR = (_num(0.0), 1e-3)
_WD = (_num(0.0), 0.0)
_TORCH_NOOPS = {"foreach", "fused", "capturable", "differentiable"}

_ADAM_PARAMS = {
    "lr": _LR, "betas": (_betas(), [0.9, 0.999]), "eps": (_num(0.0), 1e-8), "weight_decay": _WD,
    "adam_w_mode": (_bool, True), "bias_correction": (_bool, True), "torch_adam": (_bool, False),
    "amsgrad": (_bool, False),
}
OPTIMIZER_PARAMS: dict[str, dict[str, tuple[Parser, Any]]] = {
    "adam": _ADAM_PARAMS,
    "adamw": _ADAM_PARAMS,
    "sgd": {"lr": _LR, "momentum": (_num(0.0), 0.0), "dampening": (_num(), 0.0),
            "weight_decay": _WD, "nesterov": (_bool, False), "maximize": (_bool, False)},
    "lamb": {"lr": _LR, "betas": (_betas(), [0.9, 0.999]), "eps": (_num(0.0), 1e-8),
             "weight_decay": _WD, "bias_correction": (_bool, True),
             "max_coeff": (_num(0.0, lo_open=True), 10.0), "min_coeff": (_num(0.0), 0.01),
             "max_grad_norm": (_num(0.0), 0.0), "eps_inside_sqrt": (_bool, False),
             "amsgrad": (_bool, False)},
    "lion": {"lr": (_num(0.0), 1e-4), "betas": (_betas(), [0.9, 0.99]), "weight_decay": _WD},
    "adagrad": {"lr": (_num(0.0), 1e-2), "eps": (_num(0.0), 1e-10), "weight_decay": _WD,
                "lr_decay": (_num(0.0), 0.0), "initial_accumulator_value": (_num(0.0), 0.0),
                "maximize": (_bool, False)},
}
SUPPORTED_OPTIMIZERS = ("Adam", "AdamW", "SGD", "Lamb", "Lion", "Adagrad")
_UNSUPPORTED_OPTIMIZERS = ("OneBitAdam", "ZeroOneAdam", "OneBitLamb", "MuAdam", "MuAdamW", "MuSGD",
                           "Muon")


def _parse_optimizer(raw: Any) -> OptimizerConfig | None:
    if raw is None:
        return None
    sec = _section(raw, "optimizer", {"type": (_str, None), "params": (_free_dict, {})},
                   noop={"legacy_fusion"})
    name = sec["type"]
    supported = ", ".join(SUPPORTED_OPTIMIZERS)
    if name is None:
        raise ConfigError(f"optimizer.type is missing; use one of {supported}")
    kind = name.lower()
    if kind in (u.lower() for u in _UNSUPPORTED_OPTIMIZERS):
        raise ConfigError(f"optimizer.type: DeepSpeed's {name!r} is not supported by zerojax; "
                          f"supported: {supported}")
    if kind not in OPTIMIZER_PARAMS:
        close = difflib.get_close_matches(kind, list(OPTIMIZER_PARAMS), n=1)
        hint = f"did you mean {SUPPORTED_OPTIMIZERS[list(OPTIMIZER_PARAMS).index(close[0])]!r}? " \
            if close else ""
        raise ConfigError(f"optimizer.type: unknown optimizer {name!r}; {hint}supported: {supported}")
    params = _section(sec["params"], "optimizer.params", OPTIMIZER_PARAMS[kind], noop=_TORCH_NOOPS)
    if kind == "adamw":
        params["adam_w_mode"] = True          # DeepSpeed: type AdamW forces decoupled decay
    if params.get("amsgrad"):
        raise ConfigError("optimizer.params.amsgrad: AMSGrad is not supported (DeepSpeed's fused "
                          "optimizers don't support it either); remove the key or set it to false")
    if params.get("maximize"):
        raise ConfigError("optimizer.params.maximize: not supported; negate the loss instead")
    if kind == "sgd" and params["nesterov"] and (params["momentum"] <= 0 or params["dampening"] != 0):
        raise ConfigError("optimizer.params.nesterov: Nesterov momentum needs momentum > 0 and "
                          f"dampening 0 (as in torch.optim.SGD), got momentum {params['momentum']} "
                          f"and dampening {params['dampening']}")
    if kind == "lamb":
        if params["max_grad_norm"] > 0:
            raise ConfigError("optimizer.params.max_grad_norm: not supported as an optimizer "
                              "parameter (DeepSpeed rejects it too); use the top-level "
                              "'gradient_clipping' key")
        if params["min_coeff"] > params["max_coeff"]:
            raise ConfigError(f"optimizer.params: min_coeff {params['min_coeff']} is larger than "
                              f"max_coeff {params['max_coeff']}")
    return OptimizerConfig(type=kind, params=params)


# ---------------------------------------------------------------------------------------
# scheduler

_REQUIRED = object()
_WARMUP_TYPE = (_choice("log", "linear"), "log")
SCHEDULER_PARAMS: dict[str, dict[str, tuple[Parser, Any]]] = {
    "WarmupLR": {
        "warmup_min_lr": (_num(0.0), 0.0), "warmup_max_lr": (_optional(_num(0.0)), None),
        "warmup_num_steps": (_int(0), 1000), "warmup_type": _WARMUP_TYPE},
    "WarmupDecayLR": {
        # DeepSpeed's WarmupDecayLR defaults warmup_max_lr to 0.001 (not to the optimizer lr)
        "total_num_steps": (_int(1), _REQUIRED), "warmup_min_lr": (_num(0.0), 0.0),
        "warmup_max_lr": (_optional(_num(0.0)), 0.001), "warmup_num_steps": (_int(0), 1000),
        "warmup_type": _WARMUP_TYPE},
    "WarmupCosineLR": {
        "total_num_steps": (_int(1), _REQUIRED), "warmup_min_ratio": (_num(0.0), 0.0),
        "warmup_num_steps": (_int(0), 1000), "cos_min_ratio": (_num(0.0), 1e-4),
        "warmup_type": _WARMUP_TYPE},
    "OneCycle": {
        "cycle_min_lr": (_num(0.0), _REQUIRED), "cycle_max_lr": (_num(0.0), _REQUIRED),
        "decay_lr_rate": (_num(0.0), 0.0), "cycle_first_step_size": (_int(1), 2000),
        "cycle_second_step_size": (_optional(_int(0)), None),
        "cycle_first_stair_count": (_int(0), 0), "cycle_second_stair_count": (_optional(_int(0)), None),
        "decay_step_size": (_int(0), 0), "cycle_momentum": (_bool, True),
        "cycle_min_mom": (_num(0.0, 1.0), 0.8), "cycle_max_mom": (_num(0.0, 1.0), 0.9),
        "decay_mom_rate": (_num(0.0), 0.0)},
    "LRRangeTest": {
        "lr_range_test_min_lr": (_num(0.0), 1e-3), "lr_range_test_step_size": (_int(1), 2000),
        "lr_range_test_step_rate": (_num(0.0), 1.0), "lr_range_test_staircase": (_bool, False)},
}


def _parse_scheduler(raw: Any) -> SchedulerConfig | None:
    if raw is None:
        return None
    sec = _section(raw, "scheduler", {"type": (_str, None), "params": (_free_dict, {})})
    names = ", ".join(SCHEDULER_PARAMS)
    if sec["type"] is None:
        raise ConfigError(f"scheduler.type is missing; use one of {names}")
    by_lower = {n.lower(): n for n in SCHEDULER_PARAMS}
    kind = by_lower.get(sec["type"].lower())
    if kind is None:
        close = difflib.get_close_matches(sec["type"].lower(), list(by_lower), n=1)
        hint = f"did you mean {by_lower[close[0]]!r}? " if close else ""
        raise ConfigError(f"scheduler.type: unknown scheduler {sec['type']!r}; {hint}supported: {names}")
    schema = SCHEDULER_PARAMS[kind]
    missing = [k for k, (_, default) in schema.items()
               if default is _REQUIRED and k not in sec["params"]]
    if missing:
        raise ConfigError(f"scheduler.params: {kind} needs " + ", ".join(repr(k) for k in missing)
                          + " (no default in DeepSpeed either)")
    params = _section(sec["params"], "scheduler.params", schema)
    if kind == "OneCycle":
        if params["cycle_second_step_size"] is None:
            params["cycle_second_step_size"] = params["cycle_first_step_size"]
        if params["cycle_second_stair_count"] is None:
            params["cycle_second_stair_count"] = params["cycle_first_stair_count"]
    if kind in ("WarmupDecayLR", "WarmupCosineLR") and \
            params["total_num_steps"] < params["warmup_num_steps"]:
        _warn(f"scheduler.params: total_num_steps {params['total_num_steps']} is less than "
              f"warmup_num_steps {params['warmup_num_steps']}", UserWarning)
    return SchedulerConfig(type=kind, params=params)


# ---------------------------------------------------------------------------------------
# the other sections

_FP16 = {
    "enabled": (_bool, False), "loss_scale": (_num(0.0), 0.0), "initial_scale_power": (_int(0, 126), 16),
    "loss_scale_window": (_int(1), 1000), "hysteresis": (_int(1), 2),
    "consecutive_hysteresis": (_bool, False), "min_loss_scale": (_num(0.0, lo_open=True), 1.0),
    "auto_cast": (_bool, False)}
_FP16_UNSUPPORTED = {"fp16_master_weights_and_grads": _is_active}
_BF16 = {"enabled": (_bool, False)}
_BF16_NOOP = {"immediate_grad_update", "check_grad_overflow"}
_BF16_UNSUPPORTED = {"bf16_master_weights_and_grads": _is_active, "bf16_optimizer_states": _is_active}

def _bucket_elements(default: int) -> Parser:
    """A bucket size in elements; HF Trainer's "auto" (which it fills from the model) reads as
    DeepSpeed's default, since zerojax's buckets need no hidden-size rule of thumb."""
    def parse(value, path):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return default
        return _int(1)(value, path)
    return parse


_ZERO = {"stage": (_int(0, 3), 0), "stage3_param_persistence_threshold": (_int(0), 100_000),
         "sub_group_size": (_int(1), 1_000_000_000),
         # Flat-bucket collectives (zerojax.buckets): elements per gradient bucket, per
         # ZeRO-3 gather bucket, and the most gathered params a bucketed step may hold.
         "reduce_bucket_size": (_bucket_elements(500_000_000), 500_000_000),
         "allgather_bucket_size": (_bucket_elements(500_000_000), 500_000_000),
         "stage3_prefetch_bucket_size": (_bucket_elements(50_000_000), 50_000_000),
         "stage3_max_live_parameters": (_bucket_elements(1_000_000_000), 1_000_000_000)}
# Communication scheduling and bucketing that XLA does by itself.
_ZERO_NOOP = {
    "overlap_comm", "contiguous_gradients",
    "reduce_scatter", "allgather_partitions", "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "round_robin_gradients", "use_multi_rank_bucket_allreduce",
    "compute_grad_norm", "load_from_fp32_weights", "elastic_checkpoint", "ignore_unused_parameters",
    "legacy_stage1", "parameter_alignment", "memory_efficient_linear",
    "stage3_model_persistence_threshold", "stage3_module_granularity_threshold",
    "stage3_use_all_reduce_for_fetch_params", "stage3_allgather_sequential",
    "override_module_apply", "log_trace_cache_warnings", "enable_sanity_checks",
    "pipeline_loading_checkpoint", "leaf_module", "save_muon_momentum_buffer_in_memory"}


# DeepSpeed's offload_optimizer keys that tune its host-side Adam (or, `pipeline`, that it
# derives from pipeline_read/pipeline_write itself); accepted and ignored.
_OFFLOAD_OPTIMIZER_NOOP = {"pipeline", "super_offload", "cpuadam_cores_perc"}
_OFFLOAD_OPTIMIZER = {"device": (_choice("none", "cpu", "nvme"), "none"),
                      "pin_memory": (_bool, False),
                      "ratio": (_num(0.0, 1.0, lo_open=True), 1.0),
                      "nvme_path": (_optional(_str), None), "buffer_count": (_int(1), 4),
                      "pipeline_read": (_bool, False), "pipeline_write": (_bool, False),
                      "fast_init": (_bool, False)}


def _device_lowered(raw: Any) -> Any:
    """An offload section with its device name in lower case: DeepSpeed accepts "CPU"."""
    if isinstance(raw, Mapping) and isinstance(raw.get("device"), str):
        return {**raw, "device": raw["device"].lower()}
    return raw


def _parse_offload_optimizer(raw: Any, path: str) -> OffloadOptimizerConfig:
    if raw is None:
        return OffloadOptimizerConfig()
    sec = _section(_device_lowered(raw), path, _OFFLOAD_OPTIMIZER, noop=_OFFLOAD_OPTIMIZER_NOOP)
    if sec["device"] == "nvme":
        if not sec["nvme_path"]:
            raise ConfigError(f"{path}.nvme_path: required with device \"nvme\"; set it to a directory "
                              f"on a fast local disk (created if missing), e.g. \"/local_nvme\"")
        if sec["pin_memory"]:
            _warn(f"{path}.pin_memory: has no effect with device \"nvme\" (the sub-groups are "
                  f"staged in ordinary host buffers and updated on the host CPU)", UnsupportedKeyWarning)
    if sec["device"] != "none" and sec["ratio"] < 1.0:
        _warn(f"{path}.ratio: only ratio 1.0 (the whole optimizer state offloaded) is "
              f"implemented; got {sec['ratio']:g}, so all of it is offloaded", UnsupportedKeyWarning)
        sec["ratio"] = 1.0
    return OffloadOptimizerConfig(**sec)


_ZERO["offload_optimizer"] = (_parse_offload_optimizer, OffloadOptimizerConfig())

# DeepSpeed's offload_param buffer knobs size its own staging buffers; XLA schedules the
# host-to-device copies here, so they have nothing to tune.
_OFFLOAD_PARAM_NOOP = {"buffer_count", "buffer_size", "max_in_cpu"}
_OFFLOAD_PARAM = {"device": (_choice("none", "cpu", "nvme"), "none"), "pin_memory": (_bool, False),
                  "nvme_path": (_optional(_str), None)}


def _parse_offload_param(raw: Any, path: str) -> OffloadParamConfig:
    if raw is None:
        return OffloadParamConfig()
    sec = _section(_device_lowered(raw), path, _OFFLOAD_PARAM, noop=_OFFLOAD_PARAM_NOOP)
    if sec["device"] == "nvme":
        raise ConfigError(
            f"{path}.device: \"nvme\" (params on NVMe) is not supported: params are read every "
            f"step, so zerojax keeps them in host memory; use \"device\": \"cpu\" here and put the "
            f"optimizer state on NVMe with zero_optimization.offload_optimizer.device \"nvme\"")
    sec.pop("nvme_path")
    return OffloadParamConfig(**sec)


_ZERO["offload_param"] = (_parse_offload_param, OffloadParamConfig())

_ZERO_UNSUPPORTED = {
    "cpu_offload": _is_active, "cpu_offload_param": _is_active, "cpu_offload_use_pin_memory": lambda v: False,
    "zero_hpz_partition_size": lambda v: v not in (None, 0, 1),
    "zero_quantized_weights": _is_active, "zero_quantized_gradients": _is_active,
    "zero_quantized_nontrainable_weights": _is_active,
    "mics_shard_size": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
    "mics_hierarchical_params_gather": _is_active, "zeropp_loco_param": _is_active,
    "zenflow": _is_active,
}

_PIPELINE = {
    "stages": (_stages, "auto"), "partition": (_str, "best"),
    "schedule": (_choice("1f1b", "gpipe", "interleaved"), "1f1b"),
    "activation_checkpoint_interval": (_int(0), 0), "seed_layers": (_bool, False),
    "pipe_partitioned": (_bool, True), "grad_partitioned": (_bool, True)}
_ACTIVATION_CHECKPOINTING = {
    "partition_activations": (_bool, False), "cpu_checkpointing": (_bool, False),
    "contiguous_memory_optimization": (_bool, False),
    "number_checkpoints": (_optional(_int(1)), None),
    "synchronize_checkpoint_boundary": (_bool, False), "profile": (_bool, False)}
_TENSOR_PARALLEL = {"autotp_size": (_int(0), 1)}
_TENSOR_PARALLEL_UNSUPPORTED = {k: _is_active for k in (
    "tp_overlap_comm", "dtype", "tp", "tensor_parallel", "partition_config", "injection_policy_tuple",
    "vocab_parallel_lm_head", "vocab_parallel_ce_backend", "keep_module_on_host")}

_MESH = {"data": (_int(-1), -1), "sequence": (_int(1), 1), "tensor": (_int(1), 1),
         "pipe": (_int(1), 1), "replica": (_int(1), 1)}
_ZEROJAX = {
    "mesh": (lambda v, p: v, None), "sequence_parallel": (lambda v, p: v, None),  # parsed below
    "kernels": (_choice("auto", "xla", "pallas"), "auto"),
    "collectives": (_choice("auto", "xla", "bucketed"), "auto"),
    "remat": (lambda v, p: v, "auto"),      # parsed below: a mode or a per-tensor policy
    "weight_decay_mask": (_choice("all", "no_bias_norm"), "all"),
    "model": (_free_dict, {}), "data": (_free_dict, {}), "train": (_free_dict, {}),
    "rlhf": (_free_dict, {}),       # checked per algorithm by zerojax.rlhf.settings
    "compilation_cache": (_optional(_str), None), "seed": (_int(0), 0)}


# The train loop's settings (`zerojax.train`); kept as a dict with every default filled in.
_TRAIN = {
    "steps": (_optional(_int(1)), None), "log_every": (_optional(_int(1)), None),
    "eval_every": (_int(0), 0), "eval_batches": (_int(1), 4),
    "checkpoint_every": (_int(0), 0), "max_to_keep": (_optional(_int(1)), None),
    "keep_every": (_optional(_int(1)), None), "async_checkpointing": (_bool, False),
    "out": (_optional(_str), None)}
_MONITOR = {"enabled": (_bool, False), "output_path": (_str, ""), "job_name": (_str, "DeepSpeedJobName")}
_AIO = {"block_size": (_int(1), 1_048_576), "thread_count": (_int(1), 1),
        "intra_op_parallelism": (_int(1), 1)}
# libaio / GPUDirect Storage knobs with no counterpart in plain pread/pwrite: warned when
# set to other than DeepSpeed's defaults.
_AIO_UNSUPPORTED = {"queue_depth": lambda v: v != 8, "single_submit": lambda v: v is not False,
                    "overlap_events": lambda v: v is not True, "use_gds": lambda v: v is not False}


def _names(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"a list of tensor names from {list(REMAT_NAMES)}", value)
    for name in value:
        if name not in REMAT_NAMES:
            close = difflib.get_close_matches(name, REMAT_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown tensor name {name!r}{hint}; the layers name "
                              f"{', '.join(REMAT_NAMES)}")
    return tuple(value)


def _parse_remat(value: Any) -> str | RematPolicy:
    """`zerojax.remat`: "auto" | "full" | "minimal" | "none" | {policy, save, offload, remat}."""
    if not isinstance(value, Mapping):
        return _choice("auto", "full", "minimal", "none")(value, "zerojax.remat")
    sec = _section(value, "zerojax.remat", {
        "policy": (_choice("full", "minimal", "none"), "full"),
        "save": (lambda v, p: _names(v, p), ()), "offload": (lambda v, p: _names(v, p), ()),
        "remat": (lambda v, p: _names(v, p), ())})
    seen: dict[str, str] = {}
    for key in ("save", "offload", "remat"):
        for name in sec[key]:
            if name in seen:
                raise ConfigError(f"zerojax.remat: {name!r} is in both {seen[name]!r} and {key!r}; "
                                  f"name each tensor in one list")
            seen[name] = key
    if sec["policy"] == "none" and sec["remat"]:
        raise ConfigError(f"zerojax.remat: policy \"none\" keeps every activation, so the names in "
                          f"'remat' ({', '.join(sec['remat'])}) would still be kept; use policy "
                          f"\"minimal\" or \"full\"")
    return RematPolicy(**sec)


def _parse_zerojax(raw: Any) -> ZeroJaxConfig:
    sec = _section(raw, "zerojax", _ZEROJAX)
    sec["remat"] = _parse_remat(sec["remat"])
    sec["train"] = _section(sec["train"], "zerojax.train", _TRAIN)
    mesh = _section(sec["mesh"], "zerojax.mesh", _MESH)
    if mesh["data"] == 0:
        raise _fail("zerojax.mesh.data", "-1 (all remaining devices) or an integer >= 1", 0)
    sp = _section(sec["sequence_parallel"], "zerojax.sequence_parallel",
                  {"strategy": (_choice("ulysses", "ring"), "ulysses")})
    sec.update(mesh=MeshConfig(**mesh), sequence_parallel=SequenceParallelConfig(**sp))
    return ZeroJaxConfig(**sec)


_AUTOTUNING = {
    "enabled": (_bool, False), "fast": (_bool, True),
    "metric": (lambda v, p: _choice("throughput", "latency", "flops")(v.lower() if isinstance(v, str) else v, p),
               "throughput"),
    "results_dir": (_str, "autotuning_results"), "exps_dir": (_str, "autotuning_exps"),
    "overwrite": (_bool, True), "start_profile_step": (_int(0), 3), "end_profile_step": (_int(1), 5),
    "tuner_type": (_choice("gridsearch", "random", "model_based"), "gridsearch"),
    "tuner_early_stopping": (_int(1), 5), "tuner_num_trials": (_int(1), 50),
    "min_train_micro_batch_size_per_gpu": (_int(1), 1), "max_train_micro_batch_size_per_gpu": (_int(1), 1024),
    "num_tuning_micro_batch_sizes": (_int(1), 3)}
# DeepSpeed's autotuning knobs with no meaning here, warned by name when set: its tuner runs
# the user's script (arg_mappings, metric_path), profiles the model first (model_info,
# model_info_path), is told the model-parallel size (mp_size) and varies the global batch
# (min/max_train_batch_size); zerojax builds the config's model itself, counts its params,
# reads the mesh from the config and keeps train_batch_size, a training hyper-parameter.
_AUTOTUNING_IGNORED = {
    "arg_mappings": "the tuner builds the config's model itself, with no script arguments to map",
    "metric_path": "the tuner times the runs itself, with no metric file to read",
    "model_info": "the planner counts the params of the config's model",
    "model_info_path": "the planner counts the params of the config's model",
    "mp_size": "tensor/pipeline sizes come from the config's own keys",
    "max_train_batch_size": "train_batch_size stays as the config sets it (micro-batch x "
                            "gradient_accumulation_steps vary under it)",
    "min_train_batch_size": "train_batch_size stays as the config sets it (micro-batch x "
                            "gradient_accumulation_steps vary under it)"}
_AUTOTUNING_IGNORED_DEFAULTS = {"mp_size": 1, "min_train_batch_size": 1}


def _parse_autotuning(raw: Any) -> AutotuningConfig:
    raw = {} if raw is None else raw
    if isinstance(raw, Mapping):
        for key, why in _AUTOTUNING_IGNORED.items():
            if key in raw and raw[key] not in (None, {}, _AUTOTUNING_IGNORED_DEFAULTS.get(key)):
                _warn(f"autotuning.{key}: has no meaning in zerojax ({why}); ignored", UnsupportedKeyWarning)
    sec = _section(raw, "autotuning", _AUTOTUNING, noop=set(_AUTOTUNING_IGNORED))
    for key in ("results_dir", "exps_dir"):
        if not sec[key].strip():
            raise ConfigError(f"autotuning.{key}: must not be empty (a directory, e.g. "
                              f"{AutotuningConfig.__dataclass_fields__[key].default!r})")
    if sec["end_profile_step"] <= sec["start_profile_step"]:
        raise ConfigError(f"autotuning: end_profile_step {sec['end_profile_step']} must be greater than "
                          f"start_profile_step {sec['start_profile_step']} (steps after start_profile_step "
                          f"up to end_profile_step are timed)")
    if sec["max_train_micro_batch_size_per_gpu"] < sec["min_train_micro_batch_size_per_gpu"]:
        raise ConfigError(f"autotuning: max_train_micro_batch_size_per_gpu "
                          f"{sec['max_train_micro_batch_size_per_gpu']} is below "
                          f"min_train_micro_batch_size_per_gpu {sec['min_train_micro_batch_size_per_gpu']}")
    return AutotuningConfig(**sec)


# Real DeepSpeed top-level keys zerojax accepts but does not implement.
_TOP_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {k: _is_active for k in (
    "wall_clock_breakdown", "memory_breakdown", "flops_profiler", "comms_logger", "wandb",
    "comet", "monitor_config", "checkpoint", "data_efficiency",
    "compression_training", "elasticity", "hybrid_engine", "dataloader_drop_last",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "amp", "sparse_attention", "dump_state", "gradient_accumulation_dtype", "data_types",
    "disable_allgather", "sparse_gradients", "eigenvalue", "progressive_layer_drop",
    "curriculum_learning", "quantize_training", "weight_quantization", "torch_autocast",
    "compile", "nebula", "timers", "graph_harvesting", "moe", "expert_parallel",
    "zenflow", "use_node_local_storage", "vocabulary_size", "disable_python_gc",
    "managed_gradient_accumulation", "use_data_before_expert_parallelism", "log_level",
    "gradient_allreduce_op", "domino", "superoffload")}
_TOP_UNSUPPORTED["gradient_predivide_factor"] = lambda v: v not in (None, 1, 1.0)
_TOP_NOOP = {"zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer"}

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_TOP = {
    **{k: (_optional(_int(1)), None) for k in _BATCH_KEYS},
    "optimizer": (lambda v, p: v, None), "scheduler": (lambda v, p: v, None),
    "fp16": (lambda v, p: v, None), "bf16": (lambda v, p: v, None), "bfloat16": (lambda v, p: v, None),
    "gradient_clipping": (_num(0.0), 1.0), "zero_optimization": (lambda v, p: v, None),
    "steps_per_print": (_optional(_int(1)), None),
    "tensor_parallel": (lambda v, p: v, None), "sequence_parallel_size": (_int(1), 1),
    "pipeline": (lambda v, p: v, None), "activation_checkpointing": (lambda v, p: v, None),
    "tensorboard": (lambda v, p: v, None), "csv_monitor": (lambda v, p: v, None),
    "aio": (lambda v, p: v, None), "autotuning": (lambda v, p: v, None),
    "zerojax": (lambda v, p: v, None),
}


# ---------------------------------------------------------------------------------------
# the config


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated DeepSpeed-style config; build it with :meth:`Config.load`."""
    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: FP16Config = FP16Config()
    bf16: BF16Config = BF16Config()
    gradient_clipping: float = 1.0
    zero_optimization: ZeroConfig = ZeroConfig()
    steps_per_print: int | None = None
    tensor_parallel_size: int = 1
    sequence_parallel_size: int = 1
    pipeline: PipelineConfig = PipelineConfig()
    activation_checkpointing: ActivationCheckpointingConfig = ActivationCheckpointingConfig()
    tensorboard: MonitorConfig = MonitorConfig()
    csv_monitor: MonitorConfig = MonitorConfig()
    aio: AioConfig = AioConfig()
    autotuning: AutotuningConfig = AutotuningConfig()
    zerojax: ZeroJaxConfig = ZeroJaxConfig()
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=repr))

    # -- construction ----------------------------------------------------------------

    @classmethod
    def load(cls, source: "Config | Mapping[str, Any] | str | Path") -> "Config":
        """Parse a dict, a path to a JSON file, or return a Config unchanged."""
        if isinstance(source, Config):
            return source
        if isinstance(source, (str, Path)):
            return cls._from_dict(read_json(Path(source)))
        if isinstance(source, Mapping):
            return cls._from_dict(source)
        raise ConfigError(f"config: expected a dict, a path to a JSON file or a Config, "
                          f"got {type(source).__name__}")

    @classmethod
    def _from_dict(cls, raw: Mapping[str, Any]) -> "Config":
        raw = copy.deepcopy(dict(raw))
        top = _section(raw, "", _TOP, noop=_TOP_NOOP, unsupported=_TOP_UNSUPPORTED)
        if top["bf16"] is not None and top["bfloat16"] is not None:
            raise ConfigError("bf16 and bfloat16 are both set; 'bfloat16' is the old name of 'bf16', "
                              "keep one")
        fp16 = FP16Config(**_section(top["fp16"], "fp16", _FP16, unsupported=_FP16_UNSUPPORTED))
        bf16_key = "bf16" if top["bfloat16"] is None else "bfloat16"
        bf16 = BF16Config(**_section(top[bf16_key], bf16_key, _BF16, noop=_BF16_NOOP,
                                     unsupported=_BF16_UNSUPPORTED))
        if fp16.enabled and bf16.enabled:
            raise ConfigError("fp16.enabled and bf16.enabled are both true; pick one precision "
                              "(bf16 needs no loss scaling)")
        if top["zero_optimization"] is not None and not isinstance(top["zero_optimization"], Mapping):
            raise _fail("zero_optimization", 'an object like {"stage": 2}', top["zero_optimization"])
        zero = ZeroConfig(**_section(top["zero_optimization"], "zero_optimization", _ZERO,
                                     noop=_ZERO_NOOP, unsupported=_ZERO_UNSUPPORTED))
        if zero.offload_param.enabled and zero.stage != 3:
            raise ConfigError(
                f"zero_optimization.offload_param needs ZeRO stage 3 (params partitioned), got "
                f"stage {zero.stage}; set zero_optimization.stage 3, or offload only the optimizer "
                f"state with offload_optimizer")
        tp = _section(top["tensor_parallel"], "tensor_parallel", _TENSOR_PARALLEL,
                      unsupported=_TENSOR_PARALLEL_UNSUPPORTED)
        return cls(
            train_batch_size=top["train_batch_size"],
            train_micro_batch_size_per_gpu=top["train_micro_batch_size_per_gpu"],
            gradient_accumulation_steps=top["gradient_accumulation_steps"],
            optimizer=_parse_optimizer(top["optimizer"]),
            scheduler=_parse_scheduler(top["scheduler"]),
            fp16=fp16, bf16=bf16,
            gradient_clipping=top["gradient_clipping"],
            zero_optimization=zero,
            steps_per_print=top["steps_per_print"],
            tensor_parallel_size=max(1, tp["autotp_size"]),    # DeepSpeed: 0 means off
            sequence_parallel_size=top["sequence_parallel_size"],
            pipeline=PipelineConfig(**_section(top["pipeline"], "pipeline", _PIPELINE)),
            activation_checkpointing=ActivationCheckpointingConfig(**_section(
                top["activation_checkpointing"], "activation_checkpointing", _ACTIVATION_CHECKPOINTING)),
            tensorboard=MonitorConfig(**_section(top["tensorboard"], "tensorboard", _MONITOR)),
            csv_monitor=MonitorConfig(**_section(top["csv_monitor"], "csv_monitor", _MONITOR)),
            aio=AioConfig(**_section(top["aio"], "aio", _AIO, unsupported=_AIO_UNSUPPORTED)),
            autotuning=_parse_autotuning(top["autotuning"]),
            zerojax=_parse_zerojax(top["zerojax"]),
            raw=raw,
        )

    def with_overrides(self, dotted: Mapping[str, Any]) -> "Config":
        """A new Config with keys set by dotted path, e.g. {"zero_optimization.stage": 3}.

        A value of None removes the key (its default applies again).
        """
        raw = copy.deepcopy(self.raw) if self.raw else self.to_dict()
        for dotted_key, value in dotted.items():
            parts = dotted_key.split(".")
            node = raw
            for i, part in enumerate(parts[:-1]):
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                elif not isinstance(child, dict):
                    raise ConfigError(f"override {dotted_key!r}: '{'.'.join(parts[:i + 1])}' is "
                                      f"{child!r}, not an object")
                node = child
            if value is None:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = copy.deepcopy(value)
        return Config._from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The full config (defaults included) as a DeepSpeed-style dict that load() accepts."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _BATCH_KEYS if getattr(self, k) is not None}
        for name in ("optimizer", "scheduler"):
            section = getattr(self, name)
            if section is not None:
                out[name] = {"type": section.type, "params": copy.deepcopy(section.params)}
        out.update(
            fp16=dataclasses.asdict(self.fp16), bf16=dataclasses.asdict(self.bf16),
            gradient_clipping=self.gradient_clipping,
            zero_optimization=dataclasses.asdict(self.zero_optimization),
            tensor_parallel={"autotp_size": self.tensor_parallel_size},
            sequence_parallel_size=self.sequence_parallel_size,
            pipeline=dataclasses.asdict(self.pipeline),
            activation_checkpointing=dataclasses.asdict(self.activation_checkpointing),
            tensorboard=dataclasses.asdict(self.tensorboard),
            csv_monitor=dataclasses.asdict(self.csv_monitor),
            aio=dataclasses.asdict(self.aio),
            autotuning=dataclasses.asdict(self.autotuning),
            zerojax=dataclasses.asdict(self.zerojax),
        )
        if self.steps_per_print is not None:
            out["steps_per_print"] = self.steps_per_print
        return out

    # -- batch sizes ----------------------------------------------------------------

    def resolve_batch(self, data_parallel_size: int) -> BatchSizes:
        """DeepSpeed's rule train = micro × gas × dp: any two keys give the third."""
        try:
            dp = operator.index(data_parallel_size)        # numpy integers too
        except TypeError:
            dp = None
        if dp is None or isinstance(data_parallel_size, bool) or dp < 1:
            raise ConfigError(f"data-parallel size must be an integer >= 1, got {data_parallel_size!r}")
        train, micro, gas = (self.train_batch_size, self.train_micro_batch_size_per_gpu,
                             self.gradient_accumulation_steps)
        if train is None and micro is None:
            raise ConfigError("set train_batch_size (global rows per optimizer step) or "
                              "train_micro_batch_size_per_gpu (rows per device per micro-step); "
                              "the config has neither")
        if train is not None and micro is not None and gas is not None:
            if train != micro * gas * dp:
                raise ConfigError(_mismatch_message(train, micro, gas, dp))
        elif train is not None and micro is not None:
            gas = train // (micro * dp)
            if gas < 1 or train != micro * gas * dp:
                raise ConfigError(_derive_message(train, micro, "train_micro_batch_size_per_gpu", dp))
        elif train is not None and gas is not None:
            micro = train // (gas * dp)
            if micro < 1 or train != micro * gas * dp:
                raise ConfigError(_derive_message(train, gas, "gradient_accumulation_steps", dp))
        elif micro is not None:
            gas = 1 if gas is None else gas
            train = micro * gas * dp
        else:
            gas = 1
            micro = train // dp
            if micro < 1 or train != micro * dp:
                raise ConfigError(
                    f"train_batch_size {train} cannot be split evenly over data-parallel size {dp} "
                    f"(train_batch_size = train_micro_batch_size_per_gpu × "
                    f"gradient_accumulation_steps 1 × data-parallel size {dp}). Fix: set "
                    f"train_batch_size to {_near_multiples(train, dp)}")
        return BatchSizes(train_batch_size=train, micro_batch_size=micro, gradient_accumulation_steps=gas)


# ---------------------------------------------------------------------------------------
# helpers


def read_json(path: Path) -> dict[str, Any]:
    """A config file's JSON object; a missing, unreadable or malformed file is a ConfigError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a JSON object, got {type(data).__name__}")
    return data


def _near_multiples(value: int, step: int) -> str:
    """The valid values (multiples of `step`, at least `step`) nearest to `value`."""
    lower = (value // step) * step
    options = [v for v in (lower, lower + step) if v >= step and v != value]
    return " or ".join(str(v) for v in options)


def _near_divisors(n: int, target: int, count: int = 2) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    divisors = set(small) | {n // d for d in small}
    return sorted(sorted(divisors, key=lambda d: (abs(d - target), d))[:count])


def _mismatch_message(train: int, micro: int, gas: int, dp: int) -> str:
    product = micro * gas * dp
    fixes = [f"set train_batch_size to {product}"]
    if train % (gas * dp) == 0:
        fixes.append(f"set train_micro_batch_size_per_gpu to {train // (gas * dp)}")
    if train % (micro * dp) == 0:
        fixes.append(f"set gradient_accumulation_steps to {train // (micro * dp)}")
    return (f"batch sizes don't add up: train_batch_size {train} != train_micro_batch_size_per_gpu "
            f"{micro} × gradient_accumulation_steps {gas} × data-parallel size {dp} = {product}. "
            "Fix: " + ", or ".join(fixes))


def _derive_message(train: int, given: int, given_key: str, dp: int) -> str:
    """train and one of micro/gas given, the other doesn't come out a whole number >= 1."""
    other_key = ("gradient_accumulation_steps" if given_key == "train_micro_batch_size_per_gpu"
                 else "train_micro_batch_size_per_gpu")
    per_step = given * dp
    fixes = [f"set train_batch_size to {_near_multiples(train, per_step)}"]
    if train % dp == 0:
        per_device = train // dp
        fixes.append(f"set {given_key} to " + " or ".join(str(d) for d in _near_divisors(per_device, given)))
    return (f"train_batch_size {train} is not a multiple of {given_key} {given} × data-parallel size {dp} "
            f"= {per_step}, so {other_key} would be {train}/{per_step} = {train / per_step:.3g}. "
            "Fix: " + ", or ".join(fixes))
