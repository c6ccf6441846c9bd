"""`zerojax plan`: candidates compiled ahead of time on abstract state, the rest derived from them.

One plan of a tiny Llama (stages 0 and 3: six programs) serves most tests; the 70B / 256
device check runs without compiling, in a subprocess with 256 CPU devices.
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zerojax import cli, hlo_cost, initialize
from zerojax.config import Config
from zerojax.plan import ACCELERATORS, candidate_overrides, param_counts, plan
from zerojax.trainer import model_fn_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32, 16 rows over 8 data ranks: micro-batch 1 (gradient accumulation 2) or 2 (none).
CONFIG = {
    "train_batch_size": 16,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zerojax": {"model": {"type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                          "max_position_embeddings": 32},
                "data": {"seq_len": 8}},
}
KEYS = {"stage", "micro_batch", "gradient_accumulation_steps", "remat", "offload", "params_bytes",
        "grads_bytes", "optimizer_bytes", "temp_bytes", "host_bytes", "total_bytes", "fits", "step_seconds",
        "host_transfer_bytes", "deepspeed_estimate_bytes"}
H100 = ACCELERATORS["h100"]


@pytest.fixture(scope="module")
def result():
    return plan(CONFIG, jax.devices()[:8], stages=(0, 3))


def _find(result, stage, remat, micro, offload="none"):
    (found,) = [c for c in result["candidates"] if (c["stage"], c["remat"], c["micro_batch"], c["offload"])
                == (stage, remat, micro, offload)]
    return found


def _compiled_engine(stage, remat, micro):
    cfg = Config.load(CONFIG).with_overrides(candidate_overrides(stage, remat, micro, 2 // micro, "none", 16))
    model_fn, _ = model_fn_from_config(cfg)
    return initialize(model_fn=model_fn, config=cfg, abstract=True, devices=jax.devices()[:8],
                      example_batch={"input_ids": np.zeros((1, 8), np.int32)})


@pytest.mark.slow      # the module's plan compiles six programs
def test_candidates_cover_stage_micro_remat_offload_best_first(result):
    assert result["devices"] == 8 and result["data_parallel"] == 8 and result["accelerator"] == "h100"
    offloads = {0: ["none"], 3: ["none", "optimizer", "optimizer+params"]}
    want = sorted((s, r, m, o) for s in (0, 3) for r in ("none", "full") for m in (1, 2) for o in offloads[s])
    got = sorted((c["stage"], c["remat"], c["micro_batch"], c["offload"]) for c in result["candidates"])
    assert got == want
    for c in result["candidates"]:
        assert KEYS <= set(c) and c["micro_batch"] * c["gradient_accumulation_steps"] == 2
        assert c["fits"] and c["step_seconds"] > 0                      # h100's 79.6 GiB
        assert (c["deepspeed_estimate_bytes"] is None) == (c["stage"] < 2)
    steps = [c["step_seconds"] for c in result["candidates"]]
    assert steps == sorted(steps)                                       # all fit: fastest first
    notes = " ".join(result["notes"])
    for needle in ("memory_analysis", "trip count", "all-reduce + dynamic-slice", "reduce-scatter",
                   "host_transfer_bytes", "interpolated"):
        assert needle in notes


@pytest.mark.slow      # the module's plan compiles six programs
def test_state_and_temp_are_the_compiled_programs(result):
    # The compiled ends: micro-batch 1 at every stage, 2 at the config's stage (3).
    for stage, remat, micro in ((0, "none", 1), (3, "full", 1), (3, "full", 2)):
        report = _compiled_engine(stage, remat, micro).memory_report()
        c = _find(result, stage, remat, micro)
        assert (c["params_bytes"], c["grads_bytes"], c["optimizer_bytes"], c["temp_bytes"], c["host_bytes"]) == \
            (report["params"], report["grads"], report["optimizer"], report["temp"], 0)
        assert c["total_bytes"] == report["total"]
    # Stage 0 at micro-batch 2 is derived: its micro-batch-1 temp plus stage 3's bytes per row.
    for remat in ("none", "full"):
        per_row = _find(result, 3, remat, 2)["temp_bytes"] - _find(result, 3, remat, 1)["temp_bytes"]
        assert _find(result, 0, remat, 2)["temp_bytes"] == _find(result, 0, remat, 1)["temp_bytes"] + per_row


@pytest.mark.slow      # the module's plan compiles six programs
def test_zero3_shards_params_grads_and_optimizer_over_the_devices(result):
    engine = _compiled_engine(3, "full", 1)
    params = jax.tree.leaves(engine.state.params)
    whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in params)
    opt = jax.tree.leaves(engine.state.opt_state)
    for remat in ("none", "full"):
        zero0, zero3 = _find(result, 0, remat, 1), _find(result, 3, remat, 1)
        assert zero0["params_bytes"] == zero0["grads_bytes"] == whole
        assert zero3["params_bytes"] * 8 == zero3["grads_bytes"] * 8 == whole    # threshold 0: all split
        # Adam's moments split 8 ways; its step counts (scalars) stay whole on every device.
        assert zero0["optimizer_bytes"] == sum(math.prod(x.shape) * x.dtype.itemsize for x in opt)
        assert zero3["optimizer_bytes"] == sum(math.prod(x.shape) * x.dtype.itemsize // (8 if x.ndim else 1)
                                               for x in opt)
    total, largest = param_counts(engine._abstract_params)
    assert _find(result, 3, "full", 1)["deepspeed_estimate_bytes"] == 4 * largest + int(18 * total / 8)
    assert _find(result, 3, "full", 1, "optimizer")["deepspeed_estimate_bytes"] == 4 * largest + int(2 * total / 8)


@pytest.mark.slow      # the module's plan compiles six programs
def test_offload_columns_move_state_to_the_host(result):
    plain = _find(result, 3, "full", 1)
    opt, both = _find(result, 3, "full", 1, "optimizer"), _find(result, 3, "full", 1, "optimizer+params")
    # fp32: the params stay with offload_optimizer alone; offload_param moves them too.
    assert (opt["params_bytes"], opt["optimizer_bytes"], opt["host_bytes"]) == \
        (plain["params_bytes"], 0, plain["optimizer_bytes"])
    assert (both["params_bytes"], both["optimizer_bytes"], both["host_bytes"]) == \
        (0, 0, plain["optimizer_bytes"] + plain["params_bytes"])
    assert opt["host_transfer_bytes"] == 2 * plain["optimizer_bytes"]
    assert both["host_transfer_bytes"] == 2 * plain["optimizer_bytes"] + 3 * plain["params_bytes"]
    # The moved params are on the device all step; the streamed update holds one layer's state.
    assert both["temp_bytes"] == opt["temp_bytes"] + plain["params_bytes"]
    assert plain["temp_bytes"] <= opt["temp_bytes"] < plain["temp_bytes"] + plain["grads_bytes"] + plain["optimizer_bytes"]
    for row in (opt, both):          # the same program plus the host link's seconds
        extra = row["host_transfer_bytes"] / H100.host_link_bytes_per_s
        assert row["step_seconds"] == pytest.approx(plain["step_seconds"] + extra, rel=1e-9)


@pytest.mark.slow      # the module's plan compiles six programs
def test_fits_and_order_follow_device_and_host_memory(result):
    plain = _find(result, 3, "full", 1)
    limit = plain["total_bytes"] - 1          # the plain layout no longer fits; offloading does
    tight = plan(CONFIG, jax.devices()[:8], limit, stages=(0, 3))   # the same programs: none compiled again
    rows = tight["candidates"]
    assert all(c["fits"] == (c["total_bytes"] <= limit) for c in rows)
    assert [c["fits"] for c in rows] == sorted((c["fits"] for c in rows), reverse=True)
    assert not _find(tight, 3, "full", 1)["fits"]
    no_host = plan(CONFIG, jax.devices()[:8], host_memory=1, stages=(0, 3))
    assert all(c["fits"] == (c["offload"] == "none") for c in no_host["candidates"])


@pytest.mark.slow      # the module's plan compiles six programs
def test_step_time_counts_loops_and_collectives(result):
    c = _find(result, 3, "full", 1)
    s = c["seconds"]
    assert c["step_seconds"] == pytest.approx(max(s["compute"], s["memory"]) + s["collective"] + s["host_link"])
    assert s["compute"] == pytest.approx(c["flops"] / H100.fp32_flops)
    assert set(c["collective_bytes"]) >= {"all-gather", "all-reduce"}   # ZeRO-3 gathers params
    assert "all-gather" not in _find(result, 0, "full", 1)["collective_bytes"]
    # Collectives in the micro-batch loop scale with gradient accumulation: the derived
    # micro-batch-2 figures (1 micro-batch) match what its own program holds.
    engine = _compiled_engine(3, "full", 2)
    analysis = hlo_cost.analyze(engine.lower_train_step().compile().as_text(), 8)
    derived = _find(result, 3, "full", 2)["collective_bytes"]
    for kind, value in analysis.total.collective_bytes.items():
        assert derived[kind] == pytest.approx(value, rel=0.02), kind


@pytest.mark.slow      # the module's plan compiles six programs
def test_no_compile_gives_the_same_state_columns(result):
    quick = plan(CONFIG, jax.devices()[:8], stages=(0, 3), compile=False)
    assert not quick["compiled"] and any("not compiled" in n for n in quick["notes"])
    for c in quick["candidates"]:
        assert c["temp_bytes"] is None and c["step_seconds"] is None and c["remat"] is None
        full = _find(result, c["stage"], "full", 2, c["offload"])         # config's micro-batch is 2
        assert (c["params_bytes"], c["grads_bytes"], c["optimizer_bytes"], c["host_bytes"]) == \
            (full["params_bytes"], full["grads_bytes"], full["optimizer_bytes"], full["host_bytes"])


# ------------------------------------------------------------------------ the HLO walk

def test_hlo_cost_counts_loop_bodies_times_their_trip_count():
    def f(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    compiled = jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((5, 16, 16))).compile()
    analysis = hlo_cost.analyze(compiled.as_text(), 1)
    assert analysis.total.flops == 5 * 2 * 8 * 16 * 16
    assert [loop.trip_count for loop in analysis.top_loops] == [5]
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert xla["flops"] < analysis.total.flops                  # XLA counts the body once


def test_hlo_cost_reads_collective_sizes_and_groups():
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))

    def body(x):
        gathered = jax.lax.all_gather(x, "d", tiled=True)        # f32[4] -> f32[32]
        summed = jax.lax.psum(x * 2, "d")                         # f32[4]
        scattered = jax.lax.psum_scatter(gathered, "d", tiled=True)   # f32[32] -> f32[4]
        shifted = jax.lax.ppermute(x, "d", [(i, (i + 1) % 8) for i in range(8)])
        return gathered[:4] + summed + scattered + shifted

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=False))
    x = jax.device_put(jnp.ones(32), NamedSharding(mesh, P("d")))
    cost = hlo_cost.analyze(f.lower(x).compile().as_text(), 8).total
    assert cost.collective_bytes == {"all-gather": 128, "all-reduce": 16, "reduce-scatter": 128,
                                     "collective-permute": 16}
    assert cost.wire_bytes == pytest.approx({"all-gather": 128 * 7 / 8, "all-reduce": 2 * 16 * 7 / 8,
                                             "reduce-scatter": 128 * 7 / 8, "collective-permute": 16})


# ------------------------------------------------------------------------ 70B on 256 devices

LLAMA_70B = {"type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "max_position_embeddings": 4096}


@pytest.mark.slow
def test_70b_on_256_devices_state_bytes_follow_the_zero_formula(tmp_path):
    path = tmp_path / "llama70b.json"
    path.write_text(json.dumps({"train_batch_size": 1024, "bf16": {"enabled": True},
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                "zero_optimization": {"stage": 3},
                                "zerojax": {"model": LLAMA_70B, "data": {"seq_len": 4096}}}))
    # `zerojax plan` sets its own simulated device count over conftest's 8.
    proc = subprocess.run([sys.executable, "-m", "zerojax.cli", "plan", str(path), "--devices", "256",
                           "--no-compile", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["devices"] == 256 and out["data_parallel"] == 256
    h, f, kv, layers, vocab = 8192, 28672, 8 * 128, 80, 32000
    params = 2 * vocab * h + h + layers * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h)
    assert 68.9e9 < params < 69.1e9
    n = 256
    # fp32 master params and gradients (4 bytes each), Adam's two moments (8): sharded from
    # the stage on that DeepSpeed shards them (ZeRO-1 optimizer, -2 gradients, -3 params).
    formula = {0: (4, 4, 8), 1: (4, 4, 8 / n), 2: (4, 4 / n, 8 / n), 3: (4 / n, 4 / n, 8 / n)}
    for stage, (p, g, o) in formula.items():
        (row,) = [c for c in out["candidates"] if c["stage"] == stage and c["offload"] == "none"]
        for key, per_param in (("params_bytes", p), ("grads_bytes", g), ("optimizer_bytes", o)):
            assert row[key] == pytest.approx(per_param * params, rel=0.05), (stage, key)
        assert row["temp_bytes"] is None and row["step_seconds"] is None
    assert not any(c["fits"] for c in out["candidates"] if c["stage"] == 0)    # 770 GiB > 80 GB


# ------------------------------------------------------------------------ the command

def test_cli_json_is_only_json(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CONFIG))
    assert cli.main(["plan", str(path), "--devices", "8", "--device-memory", "1KiB", "--no-compile",
                     "--accelerator", "a100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["devices"] == 8 and out["accelerator"] == "a100" and out["notes"]
    assert len(out["candidates"]) == 8 and all(c["fits"] is False for c in out["candidates"])
    assert all(KEYS <= set(c) for c in out["candidates"])


def test_cli_table_says_how_columns_were_obtained(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(CONFIG))
    assert cli.main(["plan", str(path), "--devices", "8", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "best first" in out and "how each column was obtained" in out and "optimizer+params" in out


@pytest.mark.parametrize("config, argv, message", [
    ({**CONFIG, "zero_optimisation": {}}, ["--devices", "8"], "unknown key"),
    (CONFIG, ["--devices", "0"], "--devices must be an integer >= 1"),
    (CONFIG, ["--devices", "eight"], "--devices must be an integer >= 1"),
    (CONFIG, ["--devices", "8", "--device-memory", "80XB"], "--device-memory"),
    (CONFIG, ["--devices", "8", "--host-memory", "0GB"], "--host-memory"),
    (CONFIG, ["--devices", "8", "--accelerator", "tpu9"], "--accelerator: unknown 'tpu9'"),
])
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, config, argv, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert cli.main(["plan", str(path), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_one_accelerator_table():
    assert set(ACCELERATORS) == {"a100", "h100", "h200", "v5e", "v5p", "cpu"}
    for a in ACCELERATORS.values():
        assert min(a.bf16_flops, a.fp32_flops, a.hbm_bytes_per_s, a.interconnect_bytes_per_s,
                   a.host_link_bytes_per_s) > 0
