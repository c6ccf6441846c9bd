"""Every test sees 8 CPU devices; set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_worker():
    """Run `python -m tests.checkpoint_worker ARGS...` to completion; fail with its output."""
    def run(*args, timeout=240):
        proc = subprocess.run([sys.executable, "-m", "tests.checkpoint_worker", *map(str, args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout
    return run
