"""Multi-process setup: `jax.distributed.initialize` from `zerojax launch`'s environment,
or from the cluster JAX detects itself (TPU VM pod, SLURM, Open MPI).

Call `initialize()` before anything touches a device (the `train` command does it first
thing). A plain single process is left alone.

Environment read here (`zerojax launch` sets the first four; cluster recipes may too):

- ``ZEROJAX_COORDINATOR``: ``host:port`` of process 0's coordinator service.
- ``ZEROJAX_NUM_PROCESSES``, ``ZEROJAX_PROCESS_ID``: world size and this process's rank.
- ``ZEROJAX_DEVICES_PER_PROCESS``: CPU devices this process exposes (CPU backend only;
  overrides ``--xla_force_host_platform_device_count``).
- ``ZEROJAX_AUTO_DISTRIBUTED``: ``1`` forces ``jax.distributed.initialize()`` with no
  arguments (a cluster JAX detects that is not listed below); ``0`` disables detection.
"""
from __future__ import annotations

import os
import re

import jax

ENV_COORDINATOR = "ZEROJAX_COORDINATOR"
ENV_NUM_PROCESSES = "ZEROJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ZEROJAX_PROCESS_ID"
ENV_DEVICES_PER_PROCESS = "ZEROJAX_DEVICES_PER_PROCESS"
ENV_AUTO = "ZEROJAX_AUTO_DISTRIBUTED"

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count(=\S*)?")

_done: bool | None = None  # None: not called yet; else what the first call returned


def strip_device_count_flag(xla_flags: str) -> str:
    """XLA_FLAGS without ``--xla_force_host_platform_device_count=N``."""
    return " ".join(_DEVICE_COUNT_FLAG.sub("", xla_flags).split())


def _int_env(name: str, minimum: int) -> int:
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _already_initialized() -> bool:
    try:
        from jax._src import distributed as _dist
        return getattr(_dist.global_state, "client", None) is not None
    except Exception:  # private module moved: assume not
        return False


def _num_processes_after_init() -> int:
    try:
        from jax._src import distributed as _dist
        n = getattr(_dist.global_state, "num_processes", None)
        if n:
            return int(n)
    except Exception:
        pass
    return jax.process_count()


def _positive_int(name: str) -> int | None:
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return None


def _cluster_detected() -> bool:
    """A multi-process cluster whose layout `jax.distributed.initialize()` reads itself."""
    auto = os.environ.get(ENV_AUTO, "").strip().lower()
    if auto in ("0", "false", "no", "off"):
        return False
    if auto in ("1", "true", "yes", "on"):
        return True
    # SLURM: one task per process (srun); a single-task job is a plain process.
    if "SLURM_JOB_ID" in os.environ and (_positive_int("SLURM_NTASKS") or 0) > 1:
        return True
    # Open MPI (mpirun): JAX reads the ORTE URI.
    if "OMPI_MCA_orte_hnp_uri" in os.environ and (_positive_int("OMPI_COMM_WORLD_SIZE") or 0) > 1:
        return True
    # Cloud TPU VM (GCE or GKE): JAX finds the workers through the metadata server or
    # TPU_WORKER_HOSTNAMES; on a single-host slice this yields one process.
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except Exception:
        running_in_cloud_tpu_vm = False
    if running_in_cloud_tpu_vm and os.environ.get("JAX_PLATFORMS", "") in ("", "tpu"):
        return True
    return False


def initialize() -> bool:
    """Join a multi-process run if the environment describes one.

    Returns True when this process is part of a multi-process run (``jax.process_count()
    > 1`` from now on), False for a plain single process. Idempotent: later calls return
    the first call's answer and do nothing.
    """
    global _done
    if _done is not None:
        return _done
    if _already_initialized():  # the user called jax.distributed.initialize themselves
        _done = _num_processes_after_init() > 1
        return _done

    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    present = [n for n in names if os.environ.get(n)]
    if present and len(present) < len(names):
        missing = ", ".join(n for n in names if n not in present)
        raise ValueError(f"{', '.join(present)} set but {missing} not: set all three or none")

    if present:
        coordinator = os.environ[ENV_COORDINATOR]
        num_processes = _int_env(ENV_NUM_PROCESSES, 1)
        process_id = _int_env(ENV_PROCESS_ID, 0)
        if process_id >= num_processes:
            raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be < {ENV_NUM_PROCESSES}={num_processes}")
        # CPU collectives across processes need gloo; the option only affects the CPU backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if os.environ.get(ENV_DEVICES_PER_PROCESS):
            k = _int_env(ENV_DEVICES_PER_PROCESS, 1)
            jax.config.update("jax_num_cpu_devices", k)  # wins over the XLA flag
            if "XLA_FLAGS" in os.environ:
                os.environ["XLA_FLAGS"] = strip_device_count_flag(os.environ["XLA_FLAGS"])
        jax.distributed.initialize(coordinator, num_processes, process_id)
        _done = num_processes > 1
        return _done

    if _cluster_detected():
        jax.distributed.initialize()
        _done = _num_processes_after_init() > 1
        return _done

    _done = False
    return _done


def is_main_process() -> bool:
    """Process 0 alone writes metrics, plots and the progress bar."""
    return jax.process_index() == 0
