"""Fused Pallas kernels, installed as `zerojax.kernels`.

Each kernel is one Pallas source that runs in interpret mode on CPU (tests) and lowers
for NVIDIA GPUs through Pallas's Triton backend; `_backend.py` is the one place that
picks the GPU backend. Every kernel has a `jax.custom_vjp` with backward kernels.

  flash_attention(q, k, v, *, causal=True, ...)      [B, L, H, hd], GQA, any length
  rms_norm(x, weight, *, eps) / layer_norm(x, weight, bias, *, eps)
  fused_linear_cross_entropy(hidden, lm_head, labels) -> (nll sum, count), no [T, V] logits
  paged_attention(q, pos, lens, tables, k_pages, v_pages, layer)   serving: K/V in pages, no backward

Selection (`"zerojax": {"kernels": "auto" | "xla" | "pallas"}`) is `resolve`: "auto"
uses these kernels on a GPU and XLA's own ops elsewhere.
"""
from __future__ import annotations

import jax

from zerojax.kernels.cross_entropy import fused_linear_cross_entropy
from zerojax.kernels.flash_attention import flash_attention
from zerojax.kernels.norms import layer_norm, rms_norm
from zerojax.kernels.paged_attention import paged_attention

MODES = ("auto", "xla", "pallas")


def resolve(mode: str) -> str:
    """"auto" -> "pallas" on a GPU backend, "xla" otherwise; the others as given."""
    if mode not in MODES:
        raise ValueError(f"kernels must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return mode


__all__ = ["flash_attention", "fused_linear_cross_entropy", "layer_norm", "paged_attention", "resolve",
           "rms_norm"]
