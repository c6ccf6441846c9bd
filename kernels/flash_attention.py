"""Fused flash attention in Pallas: online-softmax forward, two-kernel backward.

Layout and semantics follow `jax.nn.dot_product_attention`: q is [batch, q_len, heads,
head_dim], k and v are [batch, kv_len, kv_heads, head_dim]; query head h reads K/V head
h // (heads / kv_heads) (grouped-query attention) through the BlockSpec index maps, so K/V
are never repeated in memory. Scores are scaled by 1/sqrt(head_dim); the causal mask is
aligned top-left (query i sees keys <= i). Softmax and every accumulation run in fp32;
the output has the input dtype.

The forward kernel keeps only the output and the per-row log-sum-exp for the backward.
The backward recomputes probabilities from them: one kernel walks the query blocks for a
block of keys (dK, dV, summed over the query heads of a K/V group inside the kernel) and
one walks the key blocks for a block of queries (dQ), both using delta = rowsum(dO * O).

Any length works: the sequence is padded to the block size, padded keys are masked, and
the output is sliced back. Blocks are powers of two; a compiled (Triton) kernel needs
blocks and head_dim of at least 16 (head_dim is zero-padded to a power of two >= 16).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._backend import compiler_params, resolve_interpret

# Finite so that a row whose first visited block is fully masked never produces NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _dot(a, b, contract_a: int, contract_b: int):
    """2-D matmul with fp32 accumulation; contract_* pick which axis of each is summed."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _mask_scores(s, q_start, k_start, *, causal: bool, kv_len: int, kv_padded: bool):
    """Masks keys past kv_len (padding) and, if causal, keys after the query."""
    if not (causal or kv_padded):
        return s
    shape = s.shape
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    keep = None
    if kv_padded:
        keep = k_pos < kv_len
    if causal:
        q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
        keep = (k_pos <= q_pos) if keep is None else keep & (k_pos <= q_pos)
    return jnp.where(keep, s, _MASK_VALUE)


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def _key_block_range(q_block_index, *, block_q, block_k, kv_len, causal):
    """(unmasked, upper): a query block visits key blocks [0, upper); those below `unmasked`
    lie wholly before the causal diagonal and inside kv_len, so they skip the mask."""
    valid = _i32(pl.cdiv(kv_len, block_k))  # never a block of padding only
    whole = _i32(kv_len // block_k)
    if not causal:
        return whole, valid
    q_start = q_block_index * block_q
    upper = jnp.minimum(lax.div(q_start + (block_q + block_k - 1), block_k), valid)
    return jnp.minimum(lax.div(q_start + 1, block_k), whole), upper


def _query_block_range(k_block_index, *, block_q, block_k, q_len, kv_len, causal):
    """(first, masked_end, last): a key block takes query blocks [first, last); those before
    `masked_end` cross the causal diagonal or hold padded keys, so they need the mask."""
    last = _i32(pl.cdiv(q_len, block_q))  # query rows past q_len have dO = 0 and add nothing
    k_start = k_block_index * block_k
    first = masked_end = _i32(0)
    if causal:
        first = jnp.minimum(lax.div(k_start, block_q), last)
        masked_end = jnp.clip(lax.div(k_start + (block_k + block_q - 2), block_q), first, last)
    if kv_len % block_k:
        masked_end = lax.select(k_start + block_k > kv_len, last, masked_end)
    return first, masked_end, last


def _key_block_scores(q, k_ref, v_ref, j, *, block_k, scale, mask, q_start):
    """K and V of key block j and the scaled scores q·kᵀ, masked when `mask` is given
    (blocks that straddle the causal diagonal or the padded tail)."""
    k_start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s = _dot(q, k, 1, 1) * scale
    if mask is not None:
        s = mask(s, q_start, k_start)
    return k, v, s


# ----------------------------------------------------------------------------- forward

def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, causal, block_k,
                    kv_len, kv_padded):
    block_q, head_dim = q_ref.shape
    qi = pl.program_id(2)
    q = q_ref[...]
    mask = functools.partial(_mask_scores, causal=causal, kv_len=kv_len, kv_padded=kv_padded)

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        _, v, s = _key_block_scores(q, k_ref, v_ref, j, block_k=block_k, scale=scale,
                                    mask=mask if masked else None, q_start=qi * block_q)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
        return acc, m_new, l_new

    init = (jnp.zeros((block_q, head_dim), jnp.float32),
            jnp.full((block_q,), _MASK_VALUE, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    unmasked, upper = _key_block_range(qi, block_q=block_q, block_k=block_k, kv_len=kv_len,
                                       causal=causal)
    carry = lax.fori_loop(0, unmasked, functools.partial(body, masked=False), init)
    acc, m, l = lax.fori_loop(unmasked, upper, functools.partial(body, masked=True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _forward(q, k, v, cfg):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bk = cfg["block_q"], cfg["block_k"]
    kernel = functools.partial(_forward_kernel, scale=cfg["scale"], causal=cfg["causal"],
                               block_k=bk, kv_len=cfg["kv_len"], kv_padded=kv_len != cfg["kv_len"])
    q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, q_len // bq),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
        compiler_params=cfg["params"],
        interpret=cfg["interpret"],
        name="flash_attention_forward",
    )(q, k, v)


# ---------------------------------------------------------------------------- backward

def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                 scale, causal, block_q, q_len, kv_len, kv_padded):
    block_k, head_dim = k_ref.shape
    group = q_ref.shape[1]
    kj = pl.program_id(2)
    k_start = kj * block_k
    k = k_ref[...]
    v = v_ref[...]
    mask = functools.partial(_mask_scores, causal=causal, kv_len=kv_len, kv_padded=kv_padded)
    first, masked_end, last = _query_block_range(kj, block_q=block_q, block_k=block_k,
                                                 q_len=q_len, kv_len=kv_len, causal=causal)

    def q_block(i, carry, head, masked):
        dk, dv = carry
        q_start = pl.multiple_of(i * block_q, block_q)
        rows = pl.ds(q_start, block_q)
        q = q_ref[rows, head, :]
        do = do_ref[rows, head, :]
        lse = lse_ref[head, rows]
        delta = delta_ref[head, rows]
        s = _dot(q, k, 1, 1) * scale
        if masked:
            s = mask(s, q_start, k_start)
        p = jnp.exp(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
        dp = _dot(do, v, 1, 1)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
        return dk, dv

    def one_head(head, carry):
        carry = lax.fori_loop(first, masked_end,
                              functools.partial(q_block, head=head, masked=True), carry)
        return lax.fori_loop(masked_end, last,
                             functools.partial(q_block, head=head, masked=False), carry)

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, group, one_head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, causal,
               block_k, kv_len, kv_padded):
    block_q, head_dim = q_ref.shape
    qi = pl.program_id(2)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    mask = functools.partial(_mask_scores, causal=causal, kv_len=kv_len, kv_padded=kv_padded)

    def body(j, dq, masked):
        k, v, s = _key_block_scores(q, k_ref, v_ref, j, block_k=block_k, scale=scale,
                                    mask=mask if masked else None, q_start=qi * block_q)
        p = jnp.exp(s - lse[:, None])
        dp = _dot(do, v, 1, 1)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0)

    unmasked, upper = _key_block_range(qi, block_q=block_q, block_k=block_k, kv_len=kv_len,
                                       causal=causal)
    dq = jnp.zeros((block_q, head_dim), jnp.float32)
    dq = lax.fori_loop(0, unmasked, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(unmasked, upper, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward(q, k, v, o, lse, do, cfg):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bk = cfg["block_q"], cfg["block_k"]
    kv_padded = kv_len != cfg["kv_len"]
    delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
    common = dict(compiler_params=cfg["params"], interpret=cfg["interpret"])

    # dK, dV: grid over K/V heads; each program loops over its group's query heads.
    whole_q = pl.BlockSpec((None, q_len, group, head_dim), lambda b, g, j: (b, 0, g, 0))
    whole_rows = pl.BlockSpec((None, group, q_len), lambda b, g, j: (b, g, 0))
    kv_block = pl.BlockSpec((None, bk, None, head_dim), lambda b, g, j: (b, j, g, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, scale=cfg["scale"], causal=cfg["causal"], block_q=bq,
                          q_len=cfg["q_len"], kv_len=cfg["kv_len"], kv_padded=kv_padded),
        grid=(batch, kv_heads, kv_len // bk),
        in_specs=[whole_q, kv_block, kv_block, whole_q, whole_rows, whole_rows],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="flash_attention_dkdv",
        **common,
    )(q, k, v, do, lse, delta)

    # dQ: grid over query heads and query blocks; each program loops over key blocks.
    q_block = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    rows_block = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    whole_kv = pl.BlockSpec((None, kv_len, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg["scale"], causal=cfg["causal"], block_k=bk,
                          kv_len=cfg["kv_len"], kv_padded=kv_padded),
        grid=(batch, heads, q_len // bq),
        in_specs=[q_block, whole_kv, whole_kv, q_block, rows_block, rows_block],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq",
        **common,
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


# ------------------------------------------------------------------------ custom VJP

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, cfg_key):
    return _forward(q, k, v, dict(cfg_key))[0]


def _attention_fwd(q, k, v, cfg_key):
    o, lse = _forward(q, k, v, dict(cfg_key))
    return o, (q, k, v, o, lse)


def _attention_bwd(cfg_key, residuals, do):
    return _backward(*residuals, do, dict(cfg_key))


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _block(requested: int, length: int) -> int:
    if requested < 1 or requested & (requested - 1):
        raise ValueError(f"block sizes must be powers of two, got {requested}")
    return min(requested, max(16, pl.next_power_of_2(length)))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    block_q: int = 128, block_k: int = 128,
                    interpret: bool | None = None) -> jax.Array:
    """Softmax attention softmax(q k^T / sqrt(d)) v, [batch, length, heads, head_dim] layout.

    k and v may have fewer heads than q (grouped-query attention; heads % kv_heads == 0).
    block_q / block_k are powers of two (clamped to the padded length); interpret=None runs
    Pallas interpret mode unless JAX's default backend is a GPU.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, L, H, D] and k, v [B, S, G, D]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    batch, q_len, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[2]:
        raise ValueError(f"k/v shape {k.shape} does not match q shape {q.shape}")
    kv_len = k.shape[1]
    interpret = resolve_interpret(interpret)
    bq, bk = _block(block_q, q_len), _block(block_k, kv_len)
    if not interpret and min(bq, bk) < 16:
        raise ValueError("compiled kernels need blocks of at least 16 (Triton's dot)")
    q_pad = pl.cdiv(q_len, bq) * bq
    kv_pad = pl.cdiv(kv_len, bk) * bk
    dim_pad = max(16, pl.next_power_of_2(head_dim))
    cfg = dict(scale=1.0 / math.sqrt(head_dim), causal=bool(causal), block_q=bq, block_k=bk,
               q_len=q_len, kv_len=kv_len, interpret=interpret,
               params=None if interpret else compiler_params(num_warps=4 if dim_pad <= 64 else 8))
    qp = _pad_axis(_pad_axis(q, 1, q_pad), 3, dim_pad)
    kp = _pad_axis(_pad_axis(k, 1, kv_pad), 3, dim_pad)
    vp = _pad_axis(_pad_axis(v, 1, kv_pad), 3, dim_pad)
    out = _attention(qp, kp, vp, tuple(sorted(cfg.items())))
    return out[:, :q_len, :, :head_dim]
