"""`zerojax autotune`: the planner rules out what does not fit, short real runs pick the best."""
import json
import warnings

import jax
import numpy as np
import pytest

from zerojax import autotune, cli, initialize
from zerojax.config import Config, UnsupportedKeyWarning
from zerojax.plan import plan
from zerojax.trainer import model_fn_from_config

from tests.test_plan_command import CONFIG as PLANNED

# The tiny Llama `test_plan_command` plans, 8 rows over 8 devices (one micro-batch size: two
# programs to plan), ZeRO-3 only (DeepSpeed tunes the config's stage), short runs.
CONFIG = {**PLANNED, "train_batch_size": 8,
          "autotuning": {"enabled": True, "start_profile_step": 1, "end_profile_step": 3}}


def _config(tmp_path, **autotuning):
    return {**CONFIG, "autotuning": {**CONFIG["autotuning"], "results_dir": str(tmp_path / "results"),
                                     "exps_dir": str(tmp_path / "exps"), **autotuning}}


@pytest.mark.slow
def test_autotune_times_only_what_fits_and_its_best_config_trains(tmp_path):
    config = _config(tmp_path)
    devices = jax.devices()[:8]
    planned = plan(config, devices, accelerator="cpu", stages=(3,))["candidates"]
    # A device memory that every remat "full" candidate fits in and not everything does.
    limit = max(c["total_bytes"] for c in planned if c["remat"] == "full")
    assert any(c["total_bytes"] > limit for c in planned)

    result = autotune.autotune(config, 8, device_memory=limit)
    assert result["accelerator"] == "cpu" and result["stages"] == [3]
    assert result["fitting"] < result["planned"] and result["timed"] == 3           # fast: the best 3
    timed = {e["name"] for e in result["experiments"]}
    assert result["fitting"] == sum(c["total_bytes"] <= limit for c in planned)
    for c in planned:
        if c["total_bytes"] > limit:
            assert autotune.experiment_name(c) not in timed                           # never run
    for e in result["experiments"]:
        assert e["candidate"]["fits"] and e["candidate"]["total_bytes"] <= limit and e["error"] is None
        assert e["measured_step_seconds"] > 0 and e["compiled_total_bytes"] > 0
        assert (tmp_path / "exps" / e["name"] / "metrics.json").exists()
    best = max(result["experiments"], key=lambda e: e["metric_value"])                # throughput
    assert result["best"] == best["name"]

    results = tmp_path / "results"
    assert {p.name for p in results.iterdir()} == {"ds_config_optimal.json", "cmd_optimal.txt",
                                                   "summary.txt", "summary.json"}
    summary = (results / "summary.txt").read_text()
    assert "measured s" in summary and "predicted s" in summary and best["name"] + " " in summary
    optimal = json.loads((results / "ds_config_optimal.json").read_text())
    assert "autotuning" not in optimal
    c = best["candidate"]
    assert (optimal["zero_optimization"]["stage"], optimal["train_micro_batch_size_per_gpu"],
            optimal["gradient_accumulation_steps"], optimal["train_batch_size"], optimal["zerojax"]["remat"]) == \
        (3, c["micro_batch"], c["gradient_accumulation_steps"], 8, c["remat"])
    assert ("offload_optimizer" in optimal["zero_optimization"]) == (c["offload"] != "none")

    # The written config loads and trains.
    cfg = Config.load(optimal)
    model_fn, _ = model_fn_from_config(cfg)
    engine = initialize(model_fn=model_fn, config=cfg, devices=devices)
    batch = {"input_ids": np.random.default_rng(0).integers(0, 64, (8, 8), dtype=np.int32)}
    assert np.isfinite(float(engine.train_step(batch)["loss"]))


def test_tuning_space_follows_deepspeed():
    space = lambda zero: autotune.tuning_space({**CONFIG, "zero_optimization": zero})[0]
    assert space({"stage": "all"}) == (0, 1, 2, 3)
    assert space({"stage": [3, 2, 3]}) == (2, 3)
    assert space({"stage": 1}) == (1,)
    assert autotune.tuning_space({k: v for k, v in CONFIG.items() if k != "zero_optimization"})[0] == (0,)
    stages, cfg = autotune.load({**CONFIG, "zero_optimization": {"stage": "all"}})
    assert stages == (0, 1, 2, 3) and cfg.zero_optimization.stage == 0


def _candidates():
    rows = []
    for stage in (2, 3):
        for offload in ("none", "optimizer"):
            for micro in (1, 2, 4, 8):
                rows.append({"stage": stage, "remat": "full", "offload": offload, "micro_batch": micro,
                             "gradient_accumulation_steps": 8 // micro, "fits": micro < 8,
                             "step_seconds": 1.0 / micro + stage + (offload != "none")})
    return sorted(rows, key=lambda c: (not c["fits"], c["step_seconds"]))     # the planner's order


def test_selection_fast_grid_random_and_micro_batch_bounds():
    settings = lambda **kw: Config.load({**CONFIG, "autotuning": {**CONFIG["autotuning"], **kw}}).autotuning
    fast = autotune._select(_candidates(), settings(), seed=0)
    assert [(c["stage"], c["offload"], c["micro_batch"]) for c in fast] == \
        [(2, "none", 4), (2, "none", 2), (2, "none", 1)]
    grid = autotune._select(_candidates(), settings(fast=False, num_tuning_micro_batch_sizes=2), seed=0)
    assert [(c["stage"], c["offload"], c["micro_batch"]) for c in grid] == \
        [(2, "none", 2), (2, "none", 4), (2, "optimizer", 2), (2, "optimizer", 4),
         (3, "none", 2), (3, "none", 4), (3, "optimizer", 2), (3, "optimizer", 4)]
    bounded = autotune._select(_candidates(), settings(fast=False, tuner_type="model_based",
                                                       max_train_micro_batch_size_per_gpu=2,
                                                       tuner_num_trials=3), seed=0)
    assert [(c["stage"], c["offload"], c["micro_batch"]) for c in bounded] == \
        [(2, "none", 2), (2, "none", 1), (2, "optimizer", 2)]
    key = lambda c: (c["stage"], c["offload"], c["micro_batch"])
    everything = autotune._select(_candidates(), settings(fast=False), seed=0)
    shuffled = autotune._select(_candidates(), settings(fast=False, tuner_type="random"), seed=0)
    assert sorted(map(key, shuffled)) == sorted(map(key, everything)) and all(c["fits"] for c in shuffled)
    again = autotune._select(_candidates(), settings(fast=False, tuner_type="random"), seed=0)
    assert list(map(key, again)) == list(map(key, shuffled))          # seeded by zerojax.seed


def test_knobs_without_meaning_here_are_warned_by_name():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Config.load({**CONFIG, "autotuning": {"arg_mappings": {"train_micro_batch_size_per_gpu": "--bs"},
                                              "mp_size": 2, "max_train_batch_size": 64}})
    messages = " ".join(str(w.message) for w in caught if issubclass(w.category, UnsupportedKeyWarning))
    for key in ("autotuning.arg_mappings", "autotuning.mp_size", "autotuning.max_train_batch_size"):
        assert key in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # DeepSpeed's defaults written out warn nothing
        Config.load({**CONFIG, "autotuning": {"mp_size": 1, "min_train_batch_size": 1, "metric_path": None}})


@pytest.mark.parametrize("autotuning, zero, message", [
    ({"metric": "speed"}, None, "autotuning.metric: expected one of 'throughput', 'latency', 'flops'"),
    ({"tuner_type": "bayes"}, None, "autotuning.tuner_type"),
    ({"start_profile_step": 5, "end_profile_step": 3}, None, "end_profile_step 3 must be greater"),
    ({"fats": True}, None, "did you mean 'autotuning.fast'"),
    ({"results_dir": " "}, None, "autotuning.results_dir: must not be empty"),
    ({"tuner_num_trials": 0}, None, "autotuning.tuner_num_trials"),
    ({}, {"stage": [1, 4]}, "zero_optimization.stage: a list of ZeRO stages"),
])
def test_bad_autotuning_section_exits_2(tmp_path, capsys, autotuning, zero, message):
    config = _config(tmp_path, **autotuning)
    if zero is not None:
        config["zero_optimization"] = zero
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert cli.main(["autotune", str(path), "--devices", "8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()
