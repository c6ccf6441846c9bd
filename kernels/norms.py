"""Fused RMSNorm and LayerNorm as Pallas kernels with hand-written backward passes.

Semantics equal `zerojax.models.layers.rms_norm` / `layer_norm`:

- `rms_norm`: normalise in fp32, cast back to `x.dtype`, then multiply by `weight`; the
  output dtype is `result_type(weight, x)` (as `scale * normed` promotes).
- `layer_norm`: everything (scale and bias included) in fp32, cast back to `x.dtype`.

`x` is `[..., D]`; the leading dims are flattened to rows. Each kernel program owns a block
of `block_rows` rows and the whole (padded) feature dim. The forward kernels save the
per-row `rstd` (and `mean`); the backward kernels compute `dx` and per-block partial
`dweight` (`dbias`), which are summed over blocks afterwards.

Block constraints: `block_rows` is a power of two; rows are padded up to a multiple of
it, and `D` is padded up to a power of two (Triton requires power-of-two tiles) with the
padded columns masked out of every reduction. For the GPU lowering keep
`block_rows * next_pow2(D)` at a few thousand to tens of thousands of elements (the
default does).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _backend

F32 = jnp.float32


class _Cfg(NamedTuple):
    eps: float
    block_rows: int
    interpret: bool


def _default_block_rows(d_pad: int) -> int:
    rows = max(1, min(64, 16384 // d_pad))
    return 1 << (rows.bit_length() - 1)        # round down to a power of two


def _check_block(block_rows: int) -> None:
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a positive power of two, got {block_rows}")


def _pad_to(a: jax.Array, rows: int, cols: int) -> jax.Array:
    pad_r, pad_c = rows - a.shape[0], cols - a.shape[1]
    if pad_r or pad_c:
        a = jnp.pad(a, ((0, pad_r), (0, pad_c)))
    return a


def _layout(x: jax.Array, block_rows: int | None):
    """(rows, d, padded rows, padded d, block_rows) for x [..., D]."""
    d = x.shape[-1]
    rows = 1
    for n in x.shape[:-1]:
        rows *= n
    d_pad = pl.next_power_of_2(d)
    br = _default_block_rows(d_pad) if block_rows is None else block_rows
    _check_block(br)
    rows_pad = pl.cdiv(max(rows, 1), br) * br
    return rows, d, rows_pad, d_pad, br


def _call(kernel, cfg: _Cfg, grid, in_specs, out_specs, out_shape):
    kwargs = {} if cfg.interpret else {"compiler_params": _backend.compiler_params()}
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=cfg.interpret, **kwargs)


def _row_specs(br: int, d_pad: int):
    block = pl.BlockSpec((br, d_pad), lambda i: (i, 0))
    vector = pl.BlockSpec((br,), lambda i: (i,))
    weight = pl.BlockSpec((1, d_pad), lambda i: (0, 0))
    partial = pl.BlockSpec((1, d_pad), lambda i: (i, 0))
    return block, vector, weight, partial


def _column_mask(shape, d: int):
    return lax.broadcasted_iota(jnp.int32, shape, 1) < d


# ----------------------------------------------------------------------------- RMSNorm

def _rms_fwd_kernel(x_ref, w_ref, y_ref, rstd_ref, *, eps, d):
    x = x_ref[...].astype(F32)                                   # padded columns are 0
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)
    normed = (x * rstd[:, None]).astype(x_ref.dtype).astype(F32)
    y_ref[...] = (w_ref[...].astype(F32) * normed).astype(y_ref.dtype)
    rstd_ref[...] = rstd


def _rms_bwd_kernel(x_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref, *, d):
    x = x_ref[...].astype(F32)
    rstd = rstd_ref[...]
    dy = dy_ref[...].astype(F32)
    xhat = x * rstd[:, None]
    dn = dy * w_ref[...].astype(F32)
    c = jnp.sum(dn * xhat, axis=1) / d
    dx_ref[...] = (rstd[:, None] * (dn - xhat * c[:, None])).astype(dx_ref.dtype)
    normed = xhat.astype(x_ref.dtype).astype(F32)
    dw_ref[...] = jnp.sum(dy * normed, axis=0, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, weight, cfg: _Cfg):
    return _rms_fwd(x, weight, cfg)[0]


def _rms_fwd(x, weight, cfg: _Cfg):
    rows, d, rows_pad, d_pad, br = _layout(x, cfg.block_rows)
    out_dtype = jnp.result_type(weight.dtype, x.dtype)
    x2 = _pad_to(x.reshape(rows, d), rows_pad, d_pad)
    w2 = _pad_to(weight.reshape(1, d), 1, d_pad)
    block, vector, wspec, _ = _row_specs(br, d_pad)
    y, rstd = _call(
        functools.partial(_rms_fwd_kernel, eps=cfg.eps, d=d), cfg, (rows_pad // br,),
        [block, wspec], [block, vector],
        [jax.ShapeDtypeStruct((rows_pad, d_pad), out_dtype),
         jax.ShapeDtypeStruct((rows_pad,), F32)])(x2, w2)
    y = y[:rows, :d].reshape(*x.shape[:-1], d)
    return y, (x, weight, rstd)


def _norm_bwd(kernel, cfg: _Cfg, x, params: tuple, stats: tuple, dy):
    """Both norms' backward: `kernel` on padded row blocks gives dx and per-block partial
    gradients of `params` (weight, or weight and bias), summed and unpadded here.
    `stats` are the per-row vectors the forward saved, in the kernel's argument order."""
    rows, d, rows_pad, d_pad, br = _layout(x, cfg.block_rows)
    x2 = _pad_to(x.reshape(rows, d), rows_pad, d_pad)
    w2 = _pad_to(params[0].reshape(1, d), 1, d_pad)
    dy2 = _pad_to(dy.reshape(rows, d), rows_pad, d_pad)
    block, vector, wspec, partial = _row_specs(br, d_pad)
    nb = rows_pad // br
    dx, *partials = _call(
        functools.partial(kernel, d=d), cfg, (nb,),
        [block, wspec, *[vector] * len(stats), block], [block, *[partial] * len(params)],
        [jax.ShapeDtypeStruct((rows_pad, d_pad), x.dtype),
         *[jax.ShapeDtypeStruct((nb, d_pad), F32)] * len(params)])(x2, w2, *stats, dy2)
    grads = [jnp.sum(g, axis=0)[:d].reshape(p.shape).astype(p.dtype) for g, p in zip(partials, params)]
    return (dx[:rows, :d].reshape(x.shape), *grads)


def _rms_bwd(cfg: _Cfg, res, dy):
    x, weight, rstd = res
    return _norm_bwd(_rms_bwd_kernel, cfg, x, (weight,), (rstd,), dy)


_rms_norm.defvjp(_rms_fwd, _rms_bwd)


def rms_norm(x: jax.Array, weight: jax.Array, *, eps: float, interpret: bool | None = None,
             block_rows: int | None = None) -> jax.Array:
    """Llama RMSNorm over the last dim of `x` [..., D] with `weight` [D] (see module doc)."""
    cfg = _Cfg(float(eps), block_rows, _backend.resolve_interpret(interpret))
    return _rms_norm(x, weight, cfg)


# ----------------------------------------------------------------------------- LayerNorm

def _ln_fwd_kernel(x_ref, w_ref, b_ref, y_ref, mean_ref, rstd_ref, *, eps, d):
    x = x_ref[...].astype(F32)
    mean = jnp.sum(x, axis=1) / d
    centred = jnp.where(_column_mask(x.shape, d), x - mean[:, None], 0.0)
    rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1) / d + eps)
    out = centred * rstd[:, None] * w_ref[...].astype(F32) + b_ref[...].astype(F32)
    y_ref[...] = out.astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _ln_bwd_kernel(x_ref, w_ref, mean_ref, rstd_ref, dy_ref, dx_ref, dw_ref, db_ref, *, d):
    x = x_ref[...].astype(F32)
    rstd = rstd_ref[...]
    dy = dy_ref[...].astype(F32)
    centred = jnp.where(_column_mask(x.shape, d), x - mean_ref[...][:, None], 0.0)
    xhat = centred * rstd[:, None]
    dn = dy * w_ref[...].astype(F32)
    mean_dn = jnp.sum(dn, axis=1) / d
    mean_dn_xhat = jnp.sum(dn * xhat, axis=1) / d
    dx = rstd[:, None] * (dn - mean_dn[:, None] - xhat * mean_dn_xhat[:, None])
    dx_ref[...] = dx.astype(dx_ref.dtype)
    dw_ref[...] = jnp.sum(dy * xhat, axis=0, keepdims=True)
    db_ref[...] = jnp.sum(dy, axis=0, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, weight, bias, cfg: _Cfg):
    return _ln_fwd(x, weight, bias, cfg)[0]


def _ln_fwd(x, weight, bias, cfg: _Cfg):
    rows, d, rows_pad, d_pad, br = _layout(x, cfg.block_rows)
    x2 = _pad_to(x.reshape(rows, d), rows_pad, d_pad)
    w2 = _pad_to(weight.reshape(1, d), 1, d_pad)
    b2 = _pad_to(bias.reshape(1, d), 1, d_pad)
    block, vector, wspec, _ = _row_specs(br, d_pad)
    y, mean, rstd = _call(
        functools.partial(_ln_fwd_kernel, eps=cfg.eps, d=d), cfg, (rows_pad // br,),
        [block, wspec, wspec], [block, vector, vector],
        [jax.ShapeDtypeStruct((rows_pad, d_pad), x.dtype),
         jax.ShapeDtypeStruct((rows_pad,), F32),
         jax.ShapeDtypeStruct((rows_pad,), F32)])(x2, w2, b2)
    y = y[:rows, :d].reshape(x.shape)
    return y, (x, weight, bias, mean, rstd)


def _ln_bwd(cfg: _Cfg, res, dy):
    x, weight, bias, mean, rstd = res
    return _norm_bwd(_ln_bwd_kernel, cfg, x, (weight, bias), (mean, rstd), dy)


_layer_norm.defvjp(_ln_fwd, _ln_bwd)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, *, eps: float,
               interpret: bool | None = None, block_rows: int | None = None) -> jax.Array:
    """LayerNorm over the last dim of `x` [..., D] computed in fp32 (see module doc)."""
    cfg = _Cfg(float(eps), block_rows, _backend.resolve_interpret(interpret))
    return _layer_norm(x, weight, bias, cfg)
