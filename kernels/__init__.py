"""Fused Pallas kernels (installed as `zerojax.kernels`); the kernels issue fills this in."""
