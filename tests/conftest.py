"""Every test sees 8 CPU devices; set before jax is imported anywhere."""
import os

# Backend optimisation level 0: LLVM spends about half the compile time of these tiny
# programs optimising code that then runs for milliseconds; the HLO (sharding, fusion,
# buffer assignment, so memory_analysis and collectives) is the same at any level.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil
import subprocess
import sys
import tempfile

import pytest

# One persistent compilation cache for the session, inherited by the tests' subprocesses:
# the same tiny model on the same layout is built by many tests, and each identical
# program then compiles once. Fresh per run, so no run reads another's executables; a
# config's own `compilation_cache` still wins. Count compiles with helpers.compile_events.
# pytest-xdist workers inherit the controller's directory through ZEROJAX_TESTS_XLA_CACHE.
_OWNS_CACHE = "ZEROJAX_TESTS_XLA_CACHE" not in os.environ
if _OWNS_CACHE:
    os.environ["ZEROJAX_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="zerojax-tests-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["ZEROJAX_TESTS_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"


def pytest_sessionfinish(session, exitstatus):
    if _OWNS_CACHE:
        shutil.rmtree(os.environ["ZEROJAX_TESTS_XLA_CACHE"], ignore_errors=True)

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
