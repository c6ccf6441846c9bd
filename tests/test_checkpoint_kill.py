"""SIGKILL at any moment loses nothing: `latest` always names a loadable checkpoint, and a
killed-and-resumed run ends with the same params as an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import zerojax
from zerojax.checkpoint import latest_tag, read_meta
from tests.checkpoint_worker import config
from tests.conftest import ROOT
from tests.helpers import tiny_llama


def start_worker(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.checkpoint_worker", *map(str, args)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
    raise AssertionError(f"no {prefix!r} line within {timeout}s")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.slow
def test_sigkill_during_saves_leaves_latest_loadable(tmp_path):
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(0))
    for i, delay in enumerate([0.05, 0.3, 0.7]):
        root = str(tmp_path / f"run{i}")
        proc = start_worker("save-loop", "--devices", 2, "--stage", 3, "--ckpt", root)
        wait_for_line(proc, "saved first")
        time.sleep(delay)   # the worker is now saving in a loop: the kill lands mid-save
        kill(proc)
        tag = latest_tag(root)
        assert tag is not None
        read_meta(root, tag)
        engine.load_checkpoint(root)      # loads, whatever moment the kill hit
        assert engine.global_steps == 1


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, run_worker):
    steps = 8
    straight = tmp_path / "straight.npz"
    run_worker("train", "--devices", 2, "--stage", 3, "--ckpt", tmp_path / "a", "--steps", steps,
               "--every", 2, "--out", straight)

    root = tmp_path / "b"
    proc = start_worker("train", "--devices", 2, "--stage", 3, "--ckpt", root, "--steps", steps,
                        "--every", 2, "--out", tmp_path / "never.npz")
    wait_for_line(proc, "step 5")
    kill(proc)
    assert latest_tag(str(root)) in ("global_step4", "global_step6")
    resumed = tmp_path / "resumed.npz"
    run_worker("train", "--devices", 2, "--stage", 3, "--ckpt", root, "--steps", steps,
               "--every", 2, "--out", resumed)

    a, b = np.load(straight), np.load(resumed)
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        # Bitwise: both processes run the same executable (same config, device count and
        # machine) on the same inputs, and a restore returns the saved bytes.
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
