"""`zerojax autotune`: DeepSpeed's autotuning, with the planner ruling out what cannot fit.

    zerojax autotune ds_config.json [--devices N] [--device-memory 80GiB] [--accelerator h100]

DeepSpeed's `"autotuning"` section drives it (keys and defaults as DeepSpeed's; see
`zerojax.config.AutotuningConfig`). The planner (`zerojax.plan.plan`) compiles the train
step ahead of time for every candidate - ZeRO stage x micro-batch x remat x offload - and
predicts its device memory and step time; candidates that do not fit are never run. The
ones that fit are timed with short real runs on the devices: `end_profile_step` steps each,
the steps after `start_profile_step` timed (the first includes nothing of the compile,
which happens before). The best by `metric` is written as DeepSpeed writes it:

    <results_dir>/ds_config_optimal.json   the config with the winner's keys (DeepSpeed's names)
    <results_dir>/summary.txt, summary.json, cmd_optimal.txt
    <exps_dir>/<experiment>/ds_config.json, metrics.json   one per timed experiment

What is tuned, following DeepSpeed where it says:
- ZeRO stages: the config's `zero_optimization.stage`; `"all"` or a list (DeepSpeed's
  tuning-space notation, e.g. `[2, 3]`) tunes several. Without the key: stage 0, as in
  DeepSpeed, where ZeRO stays off unless asked.
- micro-batch: `train_batch_size` stays as the config sets it (the global batch is a
  training hyper-parameter); the powers of two between `min_/max_train_micro_batch_size_per_gpu`
  that divide it over the data-parallel ranks are candidates, the largest
  `num_tuning_micro_batch_sizes` that fit of each layout are timed, with
  `gradient_accumulation_steps` making up the batch.
- remat (none/full) and offload (none, optimizer, and at stage 3 optimizer+params): unlike
  DeepSpeed's autotuner, which does not tune offload.
- Which candidates are timed: `fast` (the default) times the planner's best 3 (the
  planner is the model); otherwise up to `tuner_num_trials` in `tuner_type` order -
  "model_based" the planner's, "gridsearch" stage/offload/remat/micro-batch order,
  "random" shuffled (seed `zerojax.seed`) - stopping after `tuner_early_stopping` trials
  without a better metric.
- `metric`: "throughput" (samples/s, the default), "latency" (seconds per step) or "flops"
  (the program's FLOPs per device per second).
"""
from __future__ import annotations

import copy
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from zerojax.config import Config, ConfigError, read_json

FAST_TRIALS = 3
_GRID_ORDER = ("none", "optimizer", "optimizer+params")
_RESULT_FILES = ("ds_config_optimal.json", "cmd_optimal.txt", "summary.txt", "summary.json")


def tuning_space(raw: Mapping[str, Any]) -> tuple[tuple[int, ...], dict]:
    """(ZeRO stages to tune, the config with `zero_optimization.stage` a plain number).

    DeepSpeed's notation: a number tunes that stage, "all" stages 0-3, a list those
    stages; no key means stage 0.
    """
    raw = copy.deepcopy(dict(raw))
    zero = raw.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, Mapping) else 0
    if isinstance(stage, str) and stage.strip().lower() == "all":
        stages = (0, 1, 2, 3)
    elif isinstance(stage, list):
        if not stage or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 3 for s in stage):
            raise ConfigError(f"zero_optimization.stage: a list of ZeRO stages to tune must hold integers "
                              f"0-3, got {stage!r}")
        stages = tuple(sorted(set(stage)))
    else:
        stages = None                           # a number: checked by the config parser below
    if stages is not None:
        raw["zero_optimization"] = {**zero, "stage": stages[0]}
    if isinstance(raw.get("train_micro_batch_size_per_gpu"), list):
        raise ConfigError("train_micro_batch_size_per_gpu: a list of sizes to tune is not supported; "
                          "bound the sizes with autotuning.min_train_micro_batch_size_per_gpu and "
                          "max_train_micro_batch_size_per_gpu (train_batch_size stays fixed)")
    if stages is None:
        stages = (Config.load(raw).zero_optimization.stage,)
    return stages, raw


def _raw_config(config: Any) -> dict:
    if isinstance(config, Config):
        return copy.deepcopy(config.raw) if config.raw else config.to_dict()
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    return read_json(Path(config))


def load(config: Any, overrides: Mapping[str, Any] | None = None) -> tuple[tuple[int, ...], Config]:
    """The stages to tune and the parsed config (DeepSpeed's stage notation resolved)."""
    stages, raw = tuning_space(_raw_config(config))
    parsed = Config.load(raw)
    if overrides:
        parsed = parsed.with_overrides(overrides)
        if "zero_optimization.stage" in overrides:
            stages = (parsed.zero_optimization.stage,)
    return stages, parsed


def experiment_name(c: Mapping[str, Any]) -> str:
    """DeepSpeed's experiment names (z3_tmbspg2_gas4), with remat and offload added."""
    return (f"z{c['stage']}_tmbspg{c['micro_batch']}_gas{c['gradient_accumulation_steps']}"
            f"_remat-{c['remat']}_offload-{c['offload'].replace('+', '-')}")


def _select(candidates: list[dict], at, seed: int) -> list[dict]:
    """The fitting candidates to time, in the order they are timed."""
    fitting = [c for c in candidates if c["fits"] and
               at.min_train_micro_batch_size_per_gpu <= c["micro_batch"] <= at.max_train_micro_batch_size_per_gpu]
    kept, per_layout = [], {}
    for c in sorted(fitting, key=lambda c: -c["micro_batch"]):    # the largest micro-batches of each layout
        layout = (c["stage"], c["remat"], c["offload"])
        if per_layout.get(layout, 0) < at.num_tuning_micro_batch_sizes:
            per_layout[layout] = per_layout.get(layout, 0) + 1
            kept.append(c)
    planner_order = [c for c in fitting if c in kept]              # fitting is best first
    if at.fast:
        return planner_order[:min(FAST_TRIALS, at.tuner_num_trials)]
    if at.tuner_type == "gridsearch":
        order = sorted(kept, key=lambda c: (c["stage"], _GRID_ORDER.index(c["offload"]), c["remat"],
                                            c["micro_batch"]))
    elif at.tuner_type == "random":
        order = list(kept)
        random.Random(seed).shuffle(order)
    else:
        order = planner_order
    return order[:at.tuner_num_trials]


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "latency" else value > best


def _run(config: Config, devices: list, start: int, end: int, seed: int) -> dict:
    """Time `end` real steps of a config on the devices; steps after `start` are timed."""
    from zerojax import models
    from zerojax.engine import initialize
    from zerojax.trainer import model_fn_from_config

    model_fn, section = model_fn_from_config(config)
    vocab = getattr(models.make_config({k: v for k, v in section.items() if k != "init_from"}),
                    "vocab_size", 256)
    seq_len = int(config.zerojax.data.get("seq_len", 256))
    engine = initialize(model_fn=model_fn, config=config, devices=devices)
    rows = engine.batch_sizes.train_batch_size
    batch = {"input_ids": np.random.default_rng(seed).integers(0, vocab, (rows, seq_len), dtype=np.int32)}
    report = engine.memory_report(batch)                  # compiles the step before any timing
    times, losses = [], []
    for _ in range(end):
        begin = time.perf_counter()
        metrics = engine.train_step(batch)
        jax.block_until_ready((engine.state, metrics))
        times.append(time.perf_counter() - begin)
        losses.append(float(metrics["loss"]))
    timed = times[start:end]
    return {"step_seconds": statistics.median(timed), "timed_steps": timed, "losses": losses,
            "compiled_memory": report}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def autotune(config: Any, devices: Any = None, *, device_memory: Any = None, host_memory: Any = None,
             accelerator: str | None = None, overrides: Mapping[str, Any] | None = None,
             log: Callable[[str], None] | None = None) -> dict:
    """Plan, time the chosen candidates on `devices` (a count or a list; default all), and
    write the best config. Returns the summary (also written as summary.json)."""
    from zerojax import plan as planner

    say = log or (lambda message: None)
    stages, cfg = load(config, overrides)
    at = cfg.autotuning
    if jax.process_count() > 1:
        raise ConfigError("zerojax autotune runs in one process (over all its local devices); "
                          "start it without zerojax launch")
    available = jax.devices()
    if devices is None:
        devices = available
    elif isinstance(devices, int):
        if devices < 1 or devices > len(available):
            raise ValueError(f"--devices {devices}: this process has {len(available)} "
                             f"{available[0].platform} devices")
        devices = available[:devices]
    devices = list(devices)
    if accelerator is None:
        accel = planner.accelerator_of(devices[0])
        if accel is None:
            raise ValueError(f"--accelerator: the devices ({devices[0].device_kind}) are not in "
                             f"zerojax.plan.ACCELERATORS; pass --accelerator with the nearest of "
                             f"{', '.join(planner.ACCELERATORS)}")
    else:
        accel = planner.accelerator_named(accelerator)
    if device_memory is None:
        stats = devices[0].memory_stats() or {}
        device_memory = stats.get("bytes_limit") or accel.memory_bytes

    say(f"autotune: planning ZeRO stage(s) {', '.join(map(str, stages))} on {len(devices)} "
        f"{devices[0].platform} devices ...")
    planned = planner.plan(cfg, devices, device_memory, host_memory=host_memory,
                           accelerator=accel.name, stages=stages)
    candidates = planned["candidates"]
    chosen = _select(candidates, at, cfg.zerojax.seed)
    if not chosen:
        smallest = min(candidates, key=lambda c: c["total_bytes"])
        raise ConfigError(
            f"autotune: no candidate fits: the smallest ({experiment_name(smallest)}) needs "
            f"{smallest['total_bytes'] / 2**30:.3g} GiB per device, the limit is "
            f"{(planned['device_memory_bytes'] or 0) / 2**30:.3g} GiB; add devices, allow more "
            f"ZeRO stages (zero_optimization.stage \"all\") or raise --device-memory")
    say(f"autotune: {len(candidates)} candidates, {sum(c['fits'] for c in candidates)} fit; "
        f"timing {len(chosen)}")

    exps_dir, results_dir = Path(at.exps_dir), Path(at.results_dir)
    experiments, best, best_value, since_best = [], None, None, 0
    for candidate in chosen:
        name = experiment_name(candidate)
        exp_config = cfg.with_overrides(planner.candidate_overrides(
            candidate["stage"], candidate["remat"], candidate["micro_batch"],
            candidate["gradient_accumulation_steps"], candidate["offload"], planned["train_batch_size"]))
        ds_config = exp_config.raw
        metrics_path = exps_dir / name / "metrics.json"
        record = None
        if not at.overwrite and metrics_path.exists():
            earlier = json.loads(metrics_path.read_text())
            if earlier.get("ds_config") == ds_config and earlier.get("step_seconds"):
                record = {**earlier, "reused": True}
        if record is None:
            say(f"autotune: {name} ...")
            try:
                measured = _run(exp_config, devices, at.start_profile_step, at.end_profile_step,
                                cfg.zerojax.seed)
            except Exception as e:                  # an experiment that fails is recorded, not fatal
                measured = {"step_seconds": None, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            record = {"name": name, "ds_config": ds_config, "reused": False, **measured}
            _write_json(exps_dir / name / "ds_config.json", ds_config)
            _write_json(metrics_path, {k: v for k, v in record.items() if k != "reused"})
        step = record.get("step_seconds")
        value = None
        if step:
            value = {"throughput": planned["train_batch_size"] / step, "latency": step,
                     "flops": (candidate.get("flops") or 0.0) / step}[at.metric]
        experiments.append({"name": name, "candidate": candidate, "measured_step_seconds": step,
                            "metric_value": value, "error": record.get("error"),
                            "compiled_total_bytes": (record.get("compiled_memory") or {}).get("total"),
                            "reused": record.get("reused", False), "ds_config": ds_config})
        if value is not None and _better(at.metric, value, best_value):
            best, best_value, since_best = experiments[-1], value, 0
        else:
            since_best += 1
            if not at.fast and since_best >= at.tuner_early_stopping:
                say(f"autotune: {since_best} trials without a better {at.metric}; stopping early")
                break

    result = {"devices": len(devices), "platform": devices[0].platform, "accelerator": accel.name,
              "metric": at.metric, "stages": list(stages), "planned": len(candidates),
              "fitting": sum(c["fits"] for c in candidates), "timed": len(experiments),
              "best": best["name"] if best else None, "best_metric_value": best_value,
              "results_dir": str(results_dir), "exps_dir": str(exps_dir),
              "experiments": [{k: v for k, v in e.items() if k != "ds_config"} for e in experiments],
              "notes": _notes(at) + planned["notes"]}
    results_dir.mkdir(parents=True, exist_ok=True)
    for stale in _RESULT_FILES:                     # this run's results replace any earlier ones
        (results_dir / stale).unlink(missing_ok=True)
    if best is not None:
        optimal = {k: v for k, v in best["ds_config"].items() if k != "autotuning"}
        _write_json(results_dir / "ds_config_optimal.json", optimal)
        (results_dir / "cmd_optimal.txt").write_text(
            f"zerojax train {results_dir / 'ds_config_optimal.json'}\n")
    (results_dir / "summary.txt").write_text(format_results(result) + "\n")
    _write_json(results_dir / "summary.json", result)
    return result


def _notes(at) -> list[str]:
    how = (f"fast: the planner's best {FAST_TRIALS} fitting candidates were timed" if at.fast else
           f"up to {at.tuner_num_trials} fitting candidates timed in {at.tuner_type} order, stopping after "
           f"{at.tuner_early_stopping} without a better {at.metric}")
    return [f"{how}; each ran {at.end_profile_step} steps after compiling, the median of steps "
            f"{at.start_profile_step + 1}-{at.end_profile_step} is measured_step_seconds; "
            f"predicted_step_seconds is the planner's (for --accelerator's figures, not these devices')",
            "compiled_total_bytes: memory_report() of the timed run's own compiled step, next to the "
            "planner's derived total"]


def format_results(result: dict) -> str:
    """The table `zerojax autotune` prints: measured and predicted, in timing order."""
    size = lambda b: "-" if b is None else f"{b / 2**20:,.2f}"
    lines = [f"autotune on {result['devices']} {result['platform']} devices (accelerator figures "
             f"{result['accelerator']}), metric {result['metric']}: {result['planned']} candidates planned, "
             f"{result['fitting']} fit, {result['timed']} timed",
             f"{'experiment':<46} {'measured s':>10} {'predicted s':>11} {'metric':>11} "
             f"{'planned MiB':>11} {'compiled MiB':>12}"]
    for e in result["experiments"]:
        c = e["candidate"]
        measured = "failed" if e["measured_step_seconds"] is None else f"{e['measured_step_seconds']:.4g}"
        predicted = "-" if c.get("step_seconds") is None else f"{c['step_seconds']:.3g}"
        value = "-" if e["metric_value"] is None else f"{e['metric_value']:.4g}"
        mark = " *" if e["name"] == result["best"] else ""
        lines.append(f"{e['name']:<46} {measured:>10} {predicted:>11} {value:>11} "
                     f"{size(c['total_bytes']):>11} {size(e['compiled_total_bytes']):>12}{mark}")
        if e["error"]:
            lines.append(f"    error: {e['error']}")
    if result["best"]:
        lines.append(f"best: {result['best']} -> {os.path.join(result['results_dir'], 'ds_config_optimal.json')}")
    else:
        lines.append("no experiment ran to completion; nothing written as optimal")
    lines.append("how each column was obtained:")
    lines.extend(f"  - {note}" for note in result["notes"])
    return "\n".join(lines)
