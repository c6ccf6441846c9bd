"""One line naming the machine a table was measured on: speed ratios move with the CPU.

Machines of this project's kind differ (AMD EPYC or Intel Xeon, both AVX-512), so every
benchmark prints this line above its table and every quoted figure names it.
"""
from __future__ import annotations

import datetime
import os
import platform
import re

# The ISA features that change XLA:CPU's and PyTorch's kernels the most, best first.
_FEATURES = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [name for name in _FEATURES if name in flags]


def xla_max_isa() -> str:
    """The ceiling XLA_FLAGS puts on XLA:CPU's generated code, or the host's best."""
    found = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return found.group(1) if found else "host best"


def describe() -> str:
    features = ", ".join(cpu_features()) or "no AVX2"
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores ({features}); XLA:CPU codegen ISA: "
            f"{xla_max_isa()}; {datetime.date.today().isoformat()}")


if __name__ == "__main__":
    print(describe())
