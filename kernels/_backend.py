"""The one place the kernels' backend choice lives.

Off GPU the kernels run in Pallas interpret mode; on GPU they lower through Pallas's
Triton backend (a Mosaic GPU variant would be chosen here instead).
"""
from __future__ import annotations

import jax


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret unless JAX's default backend is a GPU."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def compiler_params(*, num_warps: int = 4, num_stages: int = 2):
    """Compiler parameters that select the Triton lowering of `pallas_call` on GPU."""
    from jax.experimental.pallas import triton as pallas_triton  # only needed when compiling

    return pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
