"""`zerojax plan`: every ZeRO stage x remat candidate compiled ahead of time on abstract state."""
import json

import jax
import numpy as np
import pytest

from zerojax import cli, initialize
from zerojax.config import Config
from zerojax.plan import param_counts, plan
from zerojax.trainer import model_fn_from_config

CONFIG = {
    "train_batch_size": 8,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "zero_optimization": {"stage": 0, "stage3_param_persistence_threshold": 0},
    "zerojax": {"model": {"type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                          "max_position_embeddings": 32},
                "data": {"seq_len": 8}},
}
KEYS = {"stage", "micro_batch", "remat", "offload", "params_bytes", "grads_bytes", "optimizer_bytes",
        "temp_bytes", "host_bytes", "fits", "deepspeed_estimate_bytes"}


@pytest.fixture(scope="module")
def result():
    return plan(CONFIG, jax.devices()[:8])


def _candidate(result, stage, remat):
    (found,) = [c for c in result["candidates"] if c["stage"] == stage and c["remat"] == remat]
    return found


def _engine(stage, remat):
    cfg = Config.load(CONFIG).with_overrides({"zero_optimization.stage": stage, "zerojax.remat": remat})
    model_fn, _ = model_fn_from_config(cfg)
    return initialize(model_fn=model_fn, config=cfg, abstract=True, devices=jax.devices()[:8],
                      example_batch={"input_ids": np.zeros((1, 8), np.int32)})


def test_every_stage_and_remat_once_best_first(result):
    assert result["devices"] == 8
    assert sorted((c["stage"], c["remat"]) for c in result["candidates"]) == \
        [(s, r) for s in range(4) for r in ("full", "none")]
    assert all(c["fits"] for c in result["candidates"])            # no --device-memory
    totals = [c["params_bytes"] + c["optimizer_bytes"] + c["temp_bytes"] for c in result["candidates"]]
    assert totals == sorted(totals)
    for c in result["candidates"]:
        assert KEYS <= set(c) and c["micro_batch"] == 1 and c["offload"] == "none"
        assert (c["deepspeed_estimate_bytes"] is None) == (c["stage"] < 2)
    assert any("memory_analysis" in n for n in result["notes"])
    assert any("all-reduce" in n and "reduce-scatter" in n for n in result["notes"])


def test_zero3_shards_params_and_optimizer_over_the_devices(result):
    engine = _engine(3, "full")
    leaves = jax.tree.leaves(engine.state.params)
    whole = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    # With a persistence threshold of 0 every param is split 8 ways (these shapes divide by 8).
    sharded = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                  for x, s in zip(leaves, jax.tree.leaves(engine.state_shardings.params)))
    assert sharded * 8 == whole
    for remat in ("none", "full"):
        zero0, zero3 = _candidate(result, 0, remat), _candidate(result, 3, remat)
        assert zero0["params_bytes"] == whole
        assert zero3["params_bytes"] * 8 == zero0["params_bytes"]
        # Adam's moments split 8 ways; its step counts (scalars) stay whole on every device.
        opt = jax.tree.leaves(engine.state.opt_state)
        assert zero0["optimizer_bytes"] == sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in opt)
        assert zero3["optimizer_bytes"] == sum(int(np.prod(x.shape)) * x.dtype.itemsize // (8 if x.ndim else 1)
                                               for x in opt)
        assert zero3["optimizer_bytes"] == sum(
            int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
            for x, s in zip(opt, jax.tree.leaves(engine.state_shardings.opt_state)))
        assert zero3["grads_bytes"] * 8 == zero0["grads_bytes"]
    total, largest = param_counts(engine._abstract_params)
    assert _candidate(result, 3, "full")["deepspeed_estimate_bytes"] == 4 * largest + int(18 * total / 8)
    assert _candidate(result, 2, "full")["deepspeed_estimate_bytes"] == 2 * total + int(18 * total / 8)


def test_temp_is_the_engines_memory_report(result):
    report = _engine(3, "full").memory_report()
    c = _candidate(result, 3, "full")
    assert (c["temp_bytes"], c["params_bytes"], c["optimizer_bytes"], c["host_bytes"]) == \
        (report["temp"], report["params"], report["optimizer"], report["host"])


def test_cli_json_parses_and_fits_flips_with_a_tiny_device_memory(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CONFIG))
    assert cli.main(["plan", str(path), "--devices", "8", "--device-memory", "1KiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)                       # only JSON on stdout
    assert out["devices"] == 8 and len(out["candidates"]) == 8 and out["notes"]
    assert all(KEYS <= set(c) and c["fits"] is False for c in out["candidates"])


@pytest.mark.parametrize("config, argv, message", [
    ({**CONFIG, "zero_optimisation": {}}, ["--devices", "8"], "unknown key"),
    (CONFIG, ["--devices", "0"], "--devices must be an integer >= 1"),
    (CONFIG, ["--devices", "8", "--device-memory", "80XB"], "--device-memory"),
])
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, config, argv, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert cli.main(["plan", str(path), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1
