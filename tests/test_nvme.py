"""ZeRO-Infinity: the optimizer state in files under nvme_path, updated sub-group by sub-group
(zerojax/nvme.py). Subprocess halves live in tests/nvme_worker.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import optax
import pytest

import zerojax
from tests.helpers import PlainMLP, mlp_batches, relative_error, tiny_llama, token_batches
from zerojax import nvme
from zerojax.config import Config, ConfigError, UnsupportedKeyWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 16
STEPS = 3
SUB_GROUP = 7_000         # tiny_llama's decayed matrices: 81,920 elements -> 12 sub-groups
BUFFERS = 3               # fewer than the sub-groups: reads wait for writes to free a buffer


def config(stage: int, nvme_path=None, *, gas: int = 1, pipelined: bool = True) -> dict:
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if nvme_path is not None:
        zero["sub_group_size"] = SUB_GROUP
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": str(nvme_path), "buffer_count": BUFFERS,
                                     "pipeline_read": pipelined, "pipeline_write": pipelined}
    return {"train_batch_size": ROWS, "gradient_accumulation_steps": gas,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
            "gradient_clipping": 1.0, "zero_optimization": zero,
            "zerojax": {"weight_decay_mask": "no_bias_norm"}}


@pytest.fixture(scope="module")
def batches():
    return token_batches(STEPS, ROWS)


STAGE1, STAGE3 = (1, 1, True), (3, 2, False)        # (stage, gas, pipelined I/O)


@pytest.fixture(scope="module", params=[STAGE1, STAGE3], ids=["stage1", "stage3-gas2-unpipelined"])
def runs(request, batches, tmp_path_factory):
    """(stage, gas, nvme_path, plain engine, nvme engine, plain losses, nvme losses) after STEPS steps."""
    stage, gas, pipelined = request.param
    nvme_path = tmp_path_factory.mktemp("nvme") / "not" / "yet"      # created by the engine
    plain = zerojax.initialize(model_fn=tiny_llama, config=config(stage, gas=gas))
    offloaded = zerojax.initialize(model_fn=tiny_llama, config=config(stage, nvme_path, gas=gas,
                                                                      pipelined=pipelined))
    plain_losses = np.array([float(plain.train_step(b)["loss"]) for b in batches])
    nvme_losses = np.array([float(offloaded.train_step(b)["loss"]) for b in batches])
    return stage, gas, nvme_path, plain, offloaded, plain_losses, nvme_losses


def test_nvme_run_equals_plain_run(runs):
    stage, gas, _, plain, offloaded, plain_losses, nvme_losses = runs
    assert offloaded.mesh.shape["data"] == 8 and offloaded.batch_sizes.gradient_accumulation_steps == gas
    groups = offloaded.nvme.groups
    # no_bias_norm: a decayed group of matrices in several sub-groups, an undecayed one of norms.
    assert [g.decay for g in groups] == [True, False]
    assert groups[0].count > BUFFERS
    np.testing.assert_allclose(nvme_losses, plain_losses, atol=2e-5, rtol=0)
    assert relative_error(offloaded.state.params, plain.state.params) <= 1e-5
    assert relative_error(offloaded.nvme.canonical_opt_state(), plain.state.opt_state) <= 1e-5
    assert int(offloaded.state.step) == STEPS


def test_state_lives_in_files_not_in_the_engine(runs):
    _, _, nvme_path, plain, offloaded, _, _ = runs
    (directory,) = os.listdir(nvme_path)
    assert directory.startswith(nvme.DIR_PREFIX)
    directory = os.path.join(nvme_path, directory)
    manifest = json.load(open(os.path.join(directory, nvme.MANIFEST)))
    assert manifest["step"] == STEPS and manifest["slot"] == STEPS % 2
    # Adam's two moments, per group, in both slots; sized for whole sub-groups.
    for slot in (0, 1):
        for g, group in enumerate(offloaded.nvme.groups):
            for j in range(2):
                path = os.path.join(directory, f"slot{slot}", f"group{g}_state{j}.bin")
                assert os.path.getsize(path) == group.count * group.sub_size * 4
    # The engine keeps the optimizer's scalars only (counts, lr, betas).
    assert all(np.shape(x) == () for x in jax.tree.leaves(offloaded.state.opt_state))
    a, b = plain.memory_report(), offloaded.memory_report()
    scalars = sum(x.nbytes for x in jax.tree.leaves(offloaded.state.opt_state))
    assert b["optimizer"] == scalars and b["nvme"] == a["optimizer"] - scalars
    assert b["params"] == a["params"] and "nvme" not in a


@pytest.mark.parametrize("runs", [STAGE3], indirect=True, ids=["stage3"])   # it shards everything
def test_checkpoints_move_between_nvme_and_plain(runs, batches, tmp_path):
    stage, gas, nvme_path, plain, offloaded, _, _ = runs
    offloaded.save_checkpoint(str(tmp_path), "nvme")
    plain.save_checkpoint(str(tmp_path), "plain")
    restored = {}
    for tag, to_nvme, source in (("nvme", False, offloaded), ("plain", True, plain)):
        engine = zerojax.initialize(model_fn=tiny_llama, config=config(
            stage, tmp_path / "restored" if to_nvme else None, gas=gas))
        engine.load_checkpoint(str(tmp_path), tag)
        assert engine.global_steps == STEPS
        # A restore returns the saved bytes, through the files too.
        opt = engine.nvme.canonical_opt_state() if to_nvme else engine.state.opt_state
        want = source.nvme.canonical_opt_state() if source.nvme else source.state.opt_state
        assert relative_error(opt, want) == 0
        assert relative_error(engine.state.params, source.state.params) == 0
        restored[to_nvme] = engine
    losses = {k: [float(e.train_step(b)["loss"]) for b in batches[:2]] for k, e in restored.items()}
    np.testing.assert_allclose(losses[True], losses[False], atol=2e-5, rtol=0)
    assert relative_error(restored[True].state.params, restored[False].state.params) <= 1e-5


def test_abstract_engine_plans_without_files(batches, tmp_path):
    # The stage-3 run's program (gas 2): compiled once for both.
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(3, tmp_path / "nvme", gas=2), abstract=True,
                                example_batch=batches[0])
    report = engine.memory_report()
    assert report["nvme"] > 0 and report["optimizer"] < 64
    assert not os.path.exists(tmp_path / "nvme")


def test_fp16_overflow_skips_the_update_and_a_failed_write_stops_the_engine(tmp_path, monkeypatch):
    cfg = {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
           "fp16": {"enabled": True, "initial_scale_power": 4},
           "zero_optimization": {"stage": 1, "sub_group_size": 100,
                                 "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path / "nvme"),
                                                       "buffer_count": 2, "pipeline_write": True}}}
    engine = zerojax.initialize(model_fn=PlainMLP, config=cfg)
    batch = mlp_batches(1, 8)[0]
    engine.train_step(batch)
    before = (jax.tree.map(np.asarray, engine.state.params), engine.nvme.canonical_opt_state(),
              engine.nvme.slot)
    metrics = engine.train_step({**batch, "scale": np.full((8,), np.inf, np.float32)})
    assert bool(metrics["skipped"]) and int(engine.state.step) == 1
    assert relative_error(engine.state.params, before[0]) == 0         # untouched, bit for bit
    assert relative_error(engine.nvme.canonical_opt_state(), before[1]) == 0
    assert engine.nvme.slot == before[2]                                 # nothing written

    # A write that fails half-way (a full disk): the step raises, the engine refuses to go on
    # with half-updated params, and loading a checkpoint puts it right.
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    write, calls = nvme.NvmeOptimizer._write, []

    def failing_write(self, *args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return write(self, *args)

    monkeypatch.setattr(nvme.NvmeOptimizer, "_write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        engine.train_step(batch)
    assert engine.nvme.slot == before[2]                                 # the files: still step 1
    with pytest.raises(RuntimeError, match="failed half-way.*load a checkpoint"):
        engine.train_step(batch)
    monkeypatch.setattr(nvme.NvmeOptimizer, "_write", write)
    engine.load_checkpoint(str(tmp_path / "ckpt"))
    assert relative_error(engine.state.params, before[0]) == 0
    assert not bool(engine.train_step(batch)["skipped"]) and int(engine.state.step) == 2


# ---- subprocesses: crash safety and the RSS property ---------------------------------------------

def _worker(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.nvme_worker", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("runs", [STAGE1], indirect=True, ids=["stage1"])   # pipelined: killed in an I/O thread
def test_kill_mid_step_leaves_checkpoint_and_files_consistent(runs, tmp_path):
    stage, gas, _, _, offloaded, _, nvme_losses = runs
    nvme_path, ckpt = tmp_path / "nvme", tmp_path / "ckpt"
    proc = _worker("crash", nvme_path, ckpt)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 17, out[-2000:] + err[-4000:]
    # The dead run's directory: its manifest still names the step the checkpoint holds.
    (stale,) = os.listdir(nvme_path)
    stale = os.path.join(nvme_path, stale)
    manifest = json.load(open(os.path.join(stale, nvme.MANIFEST)))
    assert manifest["step"] == STEPS - 1
    slot = os.path.join(stale, f"slot{manifest['slot']}")
    stale_files = {name: open(os.path.join(slot, name), "rb").read() for name in os.listdir(slot)}

    resumed = zerojax.initialize(model_fn=tiny_llama, config=config(stage, nvme_path))
    assert not os.path.exists(stale)            # a dead process's directory is cleaned up
    resumed.load_checkpoint(str(ckpt))
    assert resumed.global_steps == STEPS - 1
    mine = os.path.join(resumed.nvme.directory, f"slot{resumed.nvme.slot}")
    for name, data in stale_files.items():      # what the dead run left = what the checkpoint holds
        assert open(os.path.join(mine, name), "rb").read() == data, name
    # The resumed last step equals the uninterrupted run's.
    loss = float(resumed.train_step(token_batches(STEPS, ROWS)[-1])["loss"])
    np.testing.assert_allclose(loss, nvme_losses[-1], atol=2e-5, rtol=0)
    assert relative_error(resumed.state.params, offloaded.state.params) <= 1e-5
    assert relative_error(resumed.nvme.canonical_opt_state(), offloaded.nvme.canonical_opt_state()) <= 1e-5


@pytest.mark.slow
def test_nvme_keeps_the_optimizer_state_out_of_memory(tmp_path):
    """DESIGN's one RSS assertion: peak RSS of an NVMe run is lower than the plain run's by at
    least half of the optimizer state (Adam, 201 MB), each measured in its own process (the
    kernel's VmHWM: see nvme_worker.peak_rss for why not ru_maxrss)."""
    procs = {kind: _worker("rss", kind, tmp_path / "nvme") for kind in ("plain", "nvme")}
    results = {}
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
        results[kind] = json.loads(out.strip().splitlines()[-1])
    plain, offloaded = results["plain"], results["nvme"]
    state = plain["optimizer_state_bytes"]
    assert state >= 200e6
    np.testing.assert_allclose(offloaded["losses"], plain["losses"], atol=2e-5, rtol=0)
    assert offloaded["files"] and offloaded["files"][0].startswith(nvme.DIR_PREFIX)
    saved = plain["peak_rss_bytes"] - offloaded["peak_rss_bytes"]
    assert saved >= state / 2, (f"peak RSS plain {plain['peak_rss_bytes'] / 2**20:.0f} MiB, nvme "
                                f"{offloaded['peak_rss_bytes'] / 2**20:.0f} MiB: saved {saved / 2**20:.0f} "
                                f"MiB of a {state / 2**20:.0f} MiB optimizer state")


# ---- config and bad input ----------------------------------------------------------------------

def nvme_section(zero: dict | None = None, **keys) -> dict:
    return {"zero_optimization": {"stage": 1, **(zero or {}),
                                  "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp/z", **keys}}}


def test_config_nvme_keys_and_defaults():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = Config.load({**nvme_section({"sub_group_size": 1e6}, buffer_count=2, pipeline_read=True,
                                          pipeline_write=True, fast_init=True, pipeline=True),
                           "aio": {"block_size": 262144, "queue_depth": 8, "thread_count": 2,
                                   "single_submit": False, "overlap_events": True, "use_gds": False}})
    section = cfg.zero_optimization.offload_optimizer
    assert (section.device, section.nvme_path, section.buffer_count) == ("nvme", "/tmp/z", 2)
    assert section.pipeline_read and section.pipeline_write and not section.enabled
    assert cfg.zero_optimization.sub_group_size == 1_000_000
    assert (cfg.aio.block_size, cfg.aio.thread_count) == (262144, 2)
    assert Config.load(cfg.to_dict()) == cfg
    # DeepSpeed's defaults.
    default = Config.load(nvme_section())
    assert default.zero_optimization.sub_group_size == 1_000_000_000
    assert default.zero_optimization.offload_optimizer.buffer_count == 4
    assert not default.zero_optimization.offload_optimizer.pipeline_read
    assert (default.aio.block_size, default.aio.thread_count) == (1_048_576, 1)


@pytest.mark.parametrize("raw, message", [
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
     r'offload_optimizer\.nvme_path: required with device "nvme"; set it to a directory'),
    (nvme_section(buffer_count=0), r"offload_optimizer\.buffer_count: expected an integer >= 1, got 0"),
    (nvme_section({"sub_group_size": 0}), r"zero_optimization\.sub_group_size: expected an integer >= 1"),
    (nvme_section(nvme_path=3), r"offload_optimizer\.nvme_path: expected a string, got 3"),
    ({"aio": {"block_size": "big"}}, r"aio\.block_size: expected an integer >= 1"),
    ({"aio": {"thread_cont": 2}}, r"did you mean 'aio\.thread_count'"),
])
def test_config_bad_nvme_values_are_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(raw)


@pytest.mark.parametrize("raw, name", [
    ({"aio": {"queue_depth": 32}}, r"aio\.queue_depth"),
    ({"aio": {"use_gds": True}}, r"aio\.use_gds"),
    ({"aio": {"single_submit": True}}, r"aio\.single_submit"),
    ({"aio": {"overlap_events": False}}, r"aio\.overlap_events"),
    (nvme_section(pin_memory=True), r"offload_optimizer\.pin_memory: has no effect"),
    (nvme_section(ratio=0.5), r"offload_optimizer\.ratio: only ratio 1\.0"),
])
def test_config_meaningless_knobs_warn_by_name(raw, name):
    with pytest.warns(UnsupportedKeyWarning, match=name):
        Config.load(raw)


def _cheap_nvme(nvme_path, **extra):
    cfg = {"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": str(nvme_path)}}}
    cfg.update(extra)
    return zerojax.initialize(model_fn=PlainMLP, config=cfg)


def test_bad_nvme_paths_are_config_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"nvme_path '.*file' is a file, not a directory"):
        _cheap_nvme(a_file)
    with pytest.raises(ConfigError, match=r"nvme_path '.*file/sub' cannot be created"):
        _cheap_nvme(a_file / "sub")
    if os.geteuid() == 0:
        unwritable = "/sys"            # root writes anywhere else
    else:
        unwritable = tmp_path / "ro"
        unwritable.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=r"nvme_path '.*' is not writable"):
        _cheap_nvme(unwritable)


def test_unsupported_combinations_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"Lamb's per-tensor trust ratio is not"):
        _cheap_nvme(tmp_path, optimizer={"type": "Lamb", "params": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"optimizer= is not elementwise"):
        zerojax.initialize(model_fn=PlainMLP, optimizer=optax.lamb(1e-3), config={
            "train_batch_size": 8, "zero_optimization": {
                "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}})
    with pytest.raises(ConfigError, match=r'"nvme" is not supported with pipeline parallelism'):
        zerojax.initialize(model_fn=tiny_llama, config={**config(1, tmp_path), "pipeline": {"stages": 2}})
    # An elementwise optax optimizer of the user's is accepted.
    engine = zerojax.initialize(model_fn=PlainMLP, optimizer=optax.adamw(1e-3), abstract=True, config={
        "train_batch_size": 8, "zero_optimization": {
            "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}})
    assert engine.nvme.groups[0].size == sum(x.size for x in jax.tree.leaves(engine.state.params))
