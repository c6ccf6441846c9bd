"""`zerojax launch`: N local processes of one jax.distributed job (2 processes x 4 CPU devices)."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from zerojax.distributed import strip_device_count_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [sys.executable, "-m", "zerojax.cli", "launch"]

# Each process holds 4 of the 8 rows of arange(8); the global sum is 28.
GLOBAL_SUM_PROGRAM = textwrap.dedent("""
    import os
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import zerojax.distributed
    assert "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
    assert zerojax.distributed.initialize() is True
    assert zerojax.distributed.initialize() is True  # idempotent
    assert jax.process_count() == 2, jax.process_count()
    assert jax.device_count() == 8, jax.device_count()
    assert jax.local_device_count() == 4, jax.local_device_count()
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    pid = jax.process_index()
    local = np.arange(4, dtype=np.float32) + 4 * pid
    x = jax.make_array_from_process_local_data(sharding, local, (8,))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    print(f"process {pid} sum {float(total.addressable_data(0)):.1f}", flush=True)
""")


def _run(args, timeout=60):
    return subprocess.run(LAUNCH + list(args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_processes_four_devices_each_compute_global_sum():
    # The test process's XLA_FLAGS asks for 8 devices (conftest); children must get 4 each.
    assert "xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
    proc = _run(["--nproc", "2", "--devices-per-process", "4", "--",
                 sys.executable, "-c", GLOBAL_SUM_PROGRAM])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # The children share one pipe, so their lines may interleave: match, don't split lines.
    found = sorted(re.findall(r"process \d sum [\d.]+", proc.stdout))
    assert found == ["process 0 sum 28.0", "process 1 sum 28.0"], proc.stdout


@pytest.mark.slow
def test_failing_child_stops_the_others_and_sets_exit_code():
    program = textwrap.dedent("""
        import os, sys, time
        if os.environ["ZEROJAX_PROCESS_ID"] == "1":
            time.sleep(0.5)
            sys.exit(3)
        time.sleep(60)
    """)
    start = time.monotonic()
    proc = _run(["--nproc", "2", "--", sys.executable, "-c", program])
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, proc.stderr
    assert elapsed < 20, elapsed
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert err == ["zerojax launch: process 1 of 2 exited with code 3; stopping 1 other process(es)"], err


@pytest.mark.slow
def test_sigint_is_forwarded_to_children():
    program = "import time; print('ready', flush=True); time.sleep(60)"
    launcher = subprocess.Popen(LAUNCH + ["--nproc", "2", "--", sys.executable, "-c", program],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Both children share the pipe, so their lines can interleave ("readyready\n\n").
        seen = ""
        while seen.count("ready") < 2:
            line = launcher.stdout.readline()
            assert line, "a child exited before saying ready"
            seen += line
        start = time.monotonic()
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert time.monotonic() - start < 20
    assert launcher.returncode == 128 + signal.SIGINT, err
    assert "received SIGINT" in err


BAD_ARGS = {
    ("--nproc", "0", "--", "true"): "--nproc must be an integer >= 1",
    ("--nproc", "two", "--", "true"): "--nproc must be an integer >= 1",
    ("--nproc", "2", "--devices-per-process", "0", "--", "true"): "--devices-per-process must be",
    ("--nproc", "2"): "no command given",
    ("--nproc", "2", "--"): "no command given",
    ("--", "true"): "--nproc N is required",
    ("--nproc", "1", "--", "/nonexistent/program"): "cannot start",
}


def test_bad_arguments_exit_2_with_one_line(capsys):
    from zerojax.cli import main
    for args, message in BAD_ARGS.items():
        code = main(["launch", *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("zerojax launch: error: "), (args, lines)
        assert message in lines[0], (args, lines[0])
    # and through the real command line
    proc = _run(["--nproc", "0", "--", "true"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "zerojax launch: error: --nproc must be an integer >= 1, got 0"


def test_strip_device_count_flag():
    assert strip_device_count_flag("--xla_force_host_platform_device_count=8") == ""
    assert strip_device_count_flag("--a=1 --xla_force_host_platform_device_count=8 --b") == "--a=1 --b"


def test_initialize_is_a_noop_in_a_plain_process():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ZEROJAX_", "SLURM_", "OMPI_"))}
    program = ("import jax, zerojax.distributed as d; "
               "assert d.initialize() is False and d.initialize() is False; "
               "assert jax.process_count() == 1; print('ok')")
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
