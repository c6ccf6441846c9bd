"""`zerojax train` end to end, resume, and every bad input as exit code 2 with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

TINY = os.path.join(ROOT, "configs", "tiny.json")
# The main job's recipe at half width and depth, shorter windows: the same code paths
# (ZeRO-3, stdlib corpus, checkpoints, eval), half the time per run.
SMALLER = ("--set", "zerojax.model.hidden_size=64", "--set", "zerojax.model.intermediate_size=128",
           "--set", "zerojax.model.num_hidden_layers=2", "--set", "zerojax.data.seq_len=64")


def zerojax_cli(*args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the installed command as a user would: a fresh process with the machine's cores."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "zerojax.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    proc = zerojax_cli("train", TINY, "--steps", 60, "--out", out, *SMALLER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_train_learns_and_writes_its_outputs(trained):
    out, proc = trained
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 1.5, (first, last)          # from ~5.5 (uniform bytes) to below 4
    with open(os.path.join(out, "latest")) as f:
        assert f.read().strip() == "global_step60"
    with open(os.path.join(out, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_resumes_where_it_stopped(trained):
    out, _ = trained
    proc = zerojax_cli("train", TINY, "--steps", 80, "--out", out, *SMALLER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stderr and "step 60" in proc.stderr
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 81))                # 61..80 appended, nothing retrained


@pytest.mark.slow
def test_generate_samples_from_the_run(trained):
    out, _ = trained
    proc = zerojax_cli("generate", out, "--prompt", "def ", "--max-new-tokens", 20)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("def ") and len(proc.stdout) > 10


@pytest.mark.slow
def test_info_shows_mesh_and_memory_plan():
    proc = zerojax_cli("info", TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mesh:" in proc.stdout and "per-device memory plan" in proc.stdout


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "syntax.json").write_text('{\n  "train_batch_size": 16,\n  "optimizer": {"type": "AdamW",}\n}\n')
    with open(TINY) as f:
        tiny = json.load(f)
    (d / "empty").mkdir()
    np.arange(300, 300 + 50000, dtype=np.uint16).tofile(d / "big_ids.bin")
    return d, tiny


@pytest.mark.parametrize("case", ["syntax", "unknown_key", "bad_stage", "impossible_batch", "wrong_type",
                                  "missing_data", "empty_corpus", "token_id_too_big"])
def test_bad_input_exits_2_with_one_line(case, bad_inputs):
    from zerojax.cli import main
    d, tiny = bad_inputs
    config, extra, expected = str(d / "tiny.json"), [], None
    if case == "syntax":
        config, expected = str(d / "syntax.json"), "line 3 column"
    elif case == "unknown_key":
        extra, expected = ["--set", "zero_optimisation.stage=2"], "did you mean 'zero_optimization'"
    elif case == "bad_stage":
        extra, expected = ["--set", "zero_optimization.stage=5"], "zero_optimization.stage"
    elif case == "impossible_batch":
        extra, expected = ["--set", "train_batch_size=12"], "train_batch_size"
    elif case == "wrong_type":
        extra, expected = ["--set", 'gradient_clipping="high"'], "gradient_clipping"
    elif case == "missing_data":
        extra, expected = ["--set", f"zerojax.data.corpus={d / 'nowhere'}"], "does not exist"
    elif case == "empty_corpus":
        extra, expected = ["--set", f"zerojax.data.corpus={d / 'empty'}"], "empty"
    elif case == "token_id_too_big":
        extra, expected = ["--set", f"zerojax.data.corpus={d / 'big_ids.bin'}"], "vocab"
    (d / "tiny.json").write_text(json.dumps(tiny))
    import io, contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", config, "--steps", "1", "--out", str(d / f"out_{case}"), *extra])
    message = err.getvalue()
    assert code == 2, message
    assert message.count("\n") == 1 and expected in message, message


@pytest.mark.slow
def test_two_processes_log_the_same_losses_as_one(tmp_path):
    """`zerojax launch --nproc 2` (2 processes × 1 device) vs one process with 2 devices."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = zerojax_cli("train", TINY, "--steps", 3, "--out", one, *SMALLER,
                         env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert single.returncode == 0, single.stderr[-3000:]
    launched = zerojax_cli("launch", "--nproc", 2, "--", sys.executable, "-m", "zerojax.cli",
                           "train", TINY, "--steps", 3, "--out", two, *SMALLER)
    assert launched.returncode == 0, launched.stderr[-3000:]
    losses = lambda out: [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses(two)) == 3
    np.testing.assert_allclose(losses(two), losses(one), atol=1e-4, rtol=0)
    assert (two / "global_step3").is_dir()            # both processes wrote their shards


@pytest.mark.slow
def test_sigint_stops_gracefully_with_a_checkpoint(tmp_path):
    import signal
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-m", "zerojax.cli", "train", TINY, "--steps", "100000",
                             "--out", str(tmp_path), "--set", "steps_per_print=1", *SMALLER],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest[-3000:]
    assert "stop requested" in rest
    with open(tmp_path / "latest") as f:
        stopped_at = int(f.read().strip().removeprefix("global_step"))
    assert 3 <= stopped_at < 100000
    assert read_metrics(tmp_path)[-1].get("step", 0) <= stopped_at


@pytest.mark.slow
def test_persistent_compilation_cache(tmp_path):
    cache = tmp_path / "xla_cache"
    proc = zerojax_cli("train", TINY, "--steps", 1, "--out", tmp_path / "run", *SMALLER,
                       "--set", f"zerojax.compilation_cache={cache}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cache.is_dir() and any(cache.iterdir())
