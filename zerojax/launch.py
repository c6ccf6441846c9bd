"""`zerojax launch`: start N local processes wired for `jax.distributed` (like `torchrun`).

Each child gets ``ZEROJAX_COORDINATOR`` (127.0.0.1 and a free port),
``ZEROJAX_NUM_PROCESSES``, ``ZEROJAX_PROCESS_ID`` and ``ZEROJAX_DEVICES_PER_PROCESS``,
which `zerojax.distributed.initialize()` reads; ``--xla_force_host_platform_device_count``
is removed from its ``XLA_FLAGS`` so the per-process CPU device count is the one asked for.
If a child fails, the others are stopped (SIGTERM, then SIGKILL after a grace period) and
the first failing child's exit code is returned. SIGINT/SIGTERM are forwarded to children.

Processes that compute on the CPU are each bound to their own share of the host's cores
(`bind_cores`): XLA:CPU sizes each process's thread pool to the cores it may use, so
unbound processes run twice as many threads as cores, and a process waiting in a gloo
collective takes the core from the one it waits for. Measured on the peer benchmark's GPT,
ZeRO-3 over 2 processes on 2 cores: 659 -> 496 ms a step (benchmarks/NOTES.md).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from zerojax import host_memory
from zerojax.distributed import (ENV_COORDINATOR, ENV_DEVICES_PER_PROCESS, ENV_NUM_PROCESSES,
                                 ENV_PROCESS_ID, strip_device_count_flag)

GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(base: Mapping[str, str], coordinator: str, nproc: int, process_id: int,
              devices_per_process: int) -> dict[str, str]:
    env = dict(base)
    flags = strip_device_count_flag(env.get("XLA_FLAGS", ""))
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env[ENV_COORDINATOR] = coordinator
    env[ENV_NUM_PROCESSES] = str(nproc)
    env[ENV_PROCESS_ID] = str(process_id)
    env[ENV_DEVICES_PER_PROCESS] = str(devices_per_process)
    return env


def core_sets(nproc: int, bind_cores: str, env: Mapping[str, str]) -> list[set[int] | None]:
    """Each process's CPU cores: consecutive equal shares of this process's allowed cores, or
    None (not bound) when `bind_cores` is "off", when "auto" finds an accelerator for the
    processes to use, or when there are fewer cores than processes."""
    if bind_cores not in ("auto", "on", "off"):
        raise ValueError(f"--bind-cores must be auto, on or off, got {bind_cores!r}")
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if bind_cores == "off" or len(allowed) < nproc or (bind_cores == "auto" and not computes_on_cpu(env)):
        return [None] * nproc
    share = len(allowed) // nproc
    return [set(allowed[rank * share:(rank + 1) * share]) for rank in range(nproc)]


def computes_on_cpu(env: Mapping[str, str]) -> bool:
    """Whether JAX in the children will pick the CPU: JAX_PLATFORMS says so, or no GPU/TPU
    device node exists on this host."""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/accel0", "/dev/kfd"))


def _exit_status(returncode: int) -> int:
    """Popen's -N (killed by signal N) as the shell's 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (exit code {128 - returncode})"
    return f"exited with code {returncode}"


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)  # each child leads its own process group
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(_POLL_SECONDS)
    for p in procs:
        _signal_group(p, signal.SIGKILL)
    for p in procs:
        p.wait()


def launch(command: list[str], nproc: int, devices_per_process: int = 1,
           env: Mapping[str, str] | None = None, grace: float = GRACE_SECONDS,
           bind_cores: str = "auto") -> int:
    """Run `command` as `nproc` processes of one `jax.distributed` job; return an exit code.

    `env` is the children's base environment (default: this process's). Returns 0 when all
    children succeed, else the first failing child's exit code (128+N for signal N).
    """
    command = list(command or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("no command given: zerojax launch --nproc N -- COMMAND...")
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an integer >= 1, got {nproc!r}")
    if not isinstance(devices_per_process, int) or devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be an integer >= 1, got {devices_per_process!r}")

    base = os.environ if env is None else env
    if computes_on_cpu(base):
        base = host_memory.with_huge_pages(base)     # read at process start (host_memory)
    cores = core_sets(nproc, bind_cores, base)
    coordinator = f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            _signal_group(p, signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        try:
            for rank in range(nproc):
                procs.append(subprocess.Popen(
                    command, env=child_env(base, coordinator, nproc, rank, devices_per_process),
                    process_group=0))
                if cores[rank] is not None:
                    # Right after exec, before the program starts any thread (its threads
                    # inherit the mask); no preexec_fn: forking a threaded parent (JAX) and
                    # running Python in the child can deadlock.
                    try:
                        os.sched_setaffinity(procs[-1].pid, cores[rank])
                    except ProcessLookupError:      # it has exited already
                        pass
        except OSError as e:
            _stop(procs, grace)
            raise ValueError(f"cannot start {command[0]!r}: {e.strerror or e}") from None

        while True:
            codes = [p.poll() for p in procs]
            failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if received:
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(_POLL_SECONDS)
                _stop(procs, 0)
                name = signal.Signals(received[0]).name
                print(f"zerojax launch: received {name}; stopped {nproc} processes",
                      file=sys.stderr, flush=True)
                return 128 + received[0]
            if failed is not None:
                rank, code = failed
                others = [p for p in procs if p.poll() is None]
                tail = f"; stopping {len(others)} other process(es)" if others else ""
                print(f"zerojax launch: process {rank} of {nproc} {_describe(code)}{tail}",
                      file=sys.stderr, flush=True)
                _stop(others, grace)
                return _exit_status(code)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(_POLL_SECONDS)
    finally:
        for p in procs:
            if p.poll() is None:  # only on an unexpected error in this loop
                _signal_group(p, signal.SIGKILL)
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
