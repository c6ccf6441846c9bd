"""Paged attention over query rows as a Pallas kernel (serving; no backward pass).

Computes what `zerojax.inference.paged_attention.group_attention_xla` computes: R rows of
Q queries, each row one sequence's tokens at positions `pos` (-1: padding), attending
causally to that sequence's K/V, which sit in pages of `page_size` tokens listed by the
row's block table. One program per (row, K/V head) holds the row's queries of the query
heads that share that K/V head (Q x H/G rows of scores) and walks the row's pages, as
many as its context needs (a dynamic loop), with an online softmax in fp32.

Shapes: q [R, Q, H, K]; pos [R, Q]; lens [R] (context per row); tables [R, P] page ids;
k_pages, v_pages [layers, pages, page_size, G, K]; `layer` a scalar. For the GPU
lowering `page_size` and `K` are powers of two, as Triton tiles must be.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _backend

F32 = jnp.float32


def _kernel(q_ref, pos_ref, lens_ref, tables_ref, layer_ref, k_ref, v_ref, o_ref, *, page_size, scale):
    row, head = pl.program_id(0), pl.program_id(1)
    q = q_ref[0].astype(F32)                                   # [Q, J, K]
    Q, J, K = q.shape
    q = q.reshape(Q * J, K) * scale
    pos = jnp.broadcast_to(pos_ref[0][:, None], (Q, J)).reshape(Q * J)
    layer = layer_ref[0]
    pages = (lens_ref[row] + page_size - 1) // page_size

    def body(j, carry):
        m, l, acc = carry
        page = tables_ref[row, j]
        k = k_ref[layer, page, :, head, :].astype(F32)           # [page_size, K]
        v = v_ref[layer, page, :, head, :].astype(F32)
        s = jnp.dot(q, k.T)
        key_pos = j * page_size + jnp.arange(page_size)
        s = jnp.where(key_pos[None, :] <= pos[:, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        p = jnp.exp(s - m_safe[:, None])
        correction = jnp.where(m > -jnp.inf, jnp.exp(m - m_safe), 0.0)
        return m_new, l * correction + p.sum(axis=1), acc * correction[:, None] + jnp.dot(p, v)

    init = (jnp.full((Q * J,), -jnp.inf, F32), jnp.zeros((Q * J,), F32), jnp.zeros((Q * J, K), F32))
    _, l, acc = jax.lax.fori_loop(0, pages, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    o_ref[0] = out.reshape(Q, J, K).astype(o_ref.dtype)


def paged_attention(q_RQHK, pos_RQ, lens_R, tables_RP, k_pages, v_pages, layer, *,
                    interpret: bool | None = None, **_unused) -> jax.Array:
    """[R, Q, H, K] attention outputs in q's dtype; see the module docstring."""
    R, Q, H, K = q_RQHK.shape
    _, _, page_size, G, _ = k_pages.shape
    J = H // G
    interpret = _backend.resolve_interpret(interpret)
    kernel = lambda *refs: _kernel(*refs, page_size=page_size, scale=1.0 / float(K) ** 0.5)
    whole = lambda shape: pl.BlockSpec(shape, lambda r, g: (0,) * len(shape))
    kwargs = {} if interpret else {"compiler_params": _backend.compiler_params()}
    return pl.pallas_call(
        kernel, grid=(R, G), interpret=interpret,
        in_specs=[pl.BlockSpec((1, Q, J, K), lambda r, g: (r, 0, g, 0)),
                  pl.BlockSpec((1, Q), lambda r, g: (r, 0)),
                  whole(lens_R.shape), whole(tables_RP.shape), whole((1,)),
                  whole(k_pages.shape), whole(v_pages.shape)],
        out_specs=pl.BlockSpec((1, Q, J, K), lambda r, g: (r, 0, g, 0)),
        out_shape=jax.ShapeDtypeStruct(q_RQHK.shape, q_RQHK.dtype), **kwargs,
    )(q_RQHK, pos_RQ.astype(jnp.int32), lens_R.astype(jnp.int32), tables_RP.astype(jnp.int32),
      jnp.reshape(layer, (1,)).astype(jnp.int32), k_pages, v_pages)
