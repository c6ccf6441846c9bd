"""Ragged paged attention: one call attends a step's decode tokens and prefill chunks.

A step feeds a flat batch of T new tokens (decode tokens of running sequences and chunks of
prompts, any mix). Each layer writes their K/V into the page pool, then every token attends
to its own sequence's cached K/V up to its position. The queries are grouped two ways so no
work is spent on keys a query cannot use:

- decode rows: one query token per row (a running sequence's next token), D rows;
- prefill blocks: up to `query_block` consecutive tokens of one sequence per block, NP
  blocks; a block's keys are gathered once for all its queries.

Both groups loop over their sequences' pages `pages_per_iter` at a time with an online
softmax, for as many iterations as the longest context in the group needs (a dynamic trip
count: shapes stay static, short contexts stay cheap). The XLA path below runs anywhere;
the Pallas kernel (`zerojax.kernels.paged_attention`) computes the same function and is
chosen by the `kernels` selector.

Page 0 is the pool's trash page: padding tokens write there and nothing reads it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zerojax import compute

TRASH_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepMeta:
    """Where this step's tokens go and what they attend to (all int32, static shapes).

    T flat tokens, S sequence slots, D decode rows, NP prefill blocks of Q queries.
    Padding: a row or query with position -1 attends to nothing; a padding token writes
    to the trash page.
    """

    write_page: jax.Array     # [T] page each new token's K/V goes to
    write_offset: jax.Array   # [T] offset within that page
    block_tables: jax.Array   # [S, Pmax] the pages of each slot's sequence, in order
    kv_lens: jax.Array        # [S] tokens cached per slot after this step's writes
    decode_token: jax.Array   # [D] flat index of each decode row's token (T: padding)
    decode_slot: jax.Array    # [D]
    decode_pos: jax.Array     # [D] its position (-1: padding)
    prefill_token: jax.Array  # [NP, Q] flat indices of each block's tokens (T: padding)
    prefill_slot: jax.Array   # [NP]
    prefill_pos: jax.Array    # [NP, Q] their positions (-1: padding)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
    """The page pool of every layer plus this step's metadata; what `run_layers_cached` takes.

    `pages` = {"k": [layers, pages, page_size, kv_heads, head_dim], "v": same}.
    """

    pages: dict
    meta: StepMeta
    kernels: str = dataclasses.field(default="xla", metadata=dict(static=True))
    pages_per_iter: int = dataclasses.field(default=4, metadata=dict(static=True))

    def attend_layer(self, pages: dict, layer: jax.Array) -> "LayerAttention":
        return LayerAttention(self, pages, layer)

    def replace_pages(self, pages: dict) -> "PagedKV":
        return dataclasses.replace(self, pages=pages)


class LayerAttention:
    """`attend(q, k, v)` for one layer inside the layer scan: writes the step's K/V into
    the pages, attends, and leaves the updated pages in `.pages` for the scan's carry."""

    def __init__(self, kv: PagedKV, pages: dict, layer: jax.Array):
        self.kv, self.pages, self.layer = kv, pages, layer

    def __call__(self, q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array) -> jax.Array:
        meta = self.kv.meta
        k_pages, v_pages = self.pages["k"], self.pages["v"]
        where = (self.layer, meta.write_page, meta.write_offset)
        k_pages = k_pages.at[where].set(k_BLGK[0].astype(k_pages.dtype))
        v_pages = v_pages.at[where].set(v_BLGK[0].astype(v_pages.dtype))
        self.pages = {"k": k_pages, "v": v_pages}
        out_THK = ragged_paged_attention(q_BLHK[0], k_pages, v_pages, self.layer, meta,
                                         kernels=self.kv.kernels, pages_per_iter=self.kv.pages_per_iter)
        return out_THK[None]


def ragged_paged_attention(q_THK: jax.Array, k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array,
                           meta: StepMeta, *, kernels: str = "xla", pages_per_iter: int = 4) -> jax.Array:
    """Causal attention of T new tokens over their sequences' cached K/V; [T, H, K] out.

    `k_pages`/`v_pages`: [layers, pages, page_size, G, K] with this step's K/V already
    written; `layer` selects the layer. Query head h reads K/V head h // (H / G).
    """
    T = q_THK.shape[0]
    groups = ((meta.decode_token[:, None], meta.decode_slot, meta.decode_pos[:, None]),
              (meta.prefill_token, meta.prefill_slot, meta.prefill_pos))
    out_THK = jnp.zeros_like(q_THK)
    for token_RQ, slot_R, pos_RQ in groups:
        if token_RQ.size == 0:
            continue
        q_RQHK = q_THK[jnp.minimum(token_RQ, T - 1)]
        o_RQHK = _group_attention(q_RQHK, slot_R, pos_RQ, k_pages, v_pages, layer, meta.block_tables,
                                  meta.kv_lens, kernels=kernels, pages_per_iter=pages_per_iter)
        out_THK = out_THK.at[token_RQ.reshape(-1)].set(
            o_RQHK.reshape(-1, *q_THK.shape[1:]).astype(q_THK.dtype), mode="drop")
    return out_THK


def _group_attention(q_RQHK, slot_R, pos_RQ, k_pages, v_pages, layer, block_tables, kv_lens, *,
                     kernels, pages_per_iter):
    lens_R = jnp.where(pos_RQ.max(axis=1) >= 0, kv_lens[slot_R], 0)
    tables_RP = _pad_pages(block_tables[slot_R], pages_per_iter)
    if kernels == "pallas":
        return _pallas_group(q_RQHK, pos_RQ, lens_R, tables_RP, k_pages, v_pages, layer, pages_per_iter)
    return group_attention_xla(q_RQHK, pos_RQ, lens_R, tables_RP, k_pages, v_pages, layer, pages_per_iter)


def _pad_pages(tables_RP: jax.Array, pages_per_iter: int) -> jax.Array:
    extra = -tables_RP.shape[1] % pages_per_iter
    return jnp.pad(tables_RP, ((0, 0), (0, extra)), constant_values=TRASH_PAGE) if extra else tables_RP


def group_attention_xla(q_RQHK, pos_RQ, lens_R, tables_RP, k_pages, v_pages, layer, pages_per_iter):
    """Rows of Q queries, each row one sequence's; online softmax over its pages in fp32."""
    R, Q, H, K = q_RQHK.shape
    G, page_size = k_pages.shape[3], k_pages.shape[2]
    J = H // G
    chunk = pages_per_iter * page_size
    q = q_RQHK.reshape(R, Q, G, J, K)
    scale = 1.0 / jnp.sqrt(jnp.float32(K))
    iterations = (jnp.max(lens_R) + chunk - 1) // chunk

    def body(i, carry):
        m, l, acc = carry                                              # [R,G,Q,J], .., [R,G,Q,J,K]
        pages_RC = jax.lax.dynamic_slice_in_dim(tables_RP, i * pages_per_iter, pages_per_iter, axis=1)
        k = k_pages[layer, pages_RC].reshape(R, chunk, G, K)
        v = v_pages[layer, pages_RC].reshape(R, chunk, G, K)
        s = jnp.einsum("rqgjk,rcgk->rgqjc", q, k, preferred_element_type=jnp.float32) * scale
        key_pos = i * chunk + jnp.arange(chunk)
        visible = key_pos[None, None, :] <= pos_RQ[:, :, None]         # [R, Q, C]; pos -1 sees nothing
        s = jnp.where(visible[:, None, :, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        correction = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("rgqjc,rcgk->rgqjk", p.astype(v.dtype), v,
                                                       preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((R, G, Q, J), -jnp.inf, jnp.float32), jnp.zeros((R, G, Q, J), jnp.float32),
            jnp.zeros((R, G, Q, J, K), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, iterations, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(0, 2, 1, 3, 4).reshape(R, Q, H, K)


def _pallas_group(q_RQHK, pos_RQ, lens_R, tables_RP, k_pages, v_pages, layer, pages_per_iter):
    """The Pallas kernel per tensor shard: heads (and K/V heads unless replicated) split."""
    from zerojax.kernels import paged_attention

    del pages_per_iter              # the kernel walks one page at a time
    kernel = paged_attention
    policy = compute.current()
    if policy.mesh is None or policy.mesh.shape.get("tensor", 1) == 1:
        return kernel(q_RQHK, pos_RQ, lens_R, tables_RP, k_pages, v_pages, layer)
    heads, kv_heads = q_RQHK.shape[2], k_pages.shape[3]
    q_axis, kv_axis = policy.spec(("heads",))[0], policy.spec(("kv_heads",))[0]

    def body(q, pos, lens, tables, k, v, layer):
        if kv_axis is None and q.shape[2] < heads:
            # Fewer K/V heads than tensor ranks: keep the one this rank's query heads read.
            first = jax.lax.axis_index(q_axis) * q.shape[2]
            k = jax.lax.dynamic_slice_in_dim(k, first // (heads // kv_heads), 1, axis=3)
            v = jax.lax.dynamic_slice_in_dim(v, first // (heads // kv_heads), 1, axis=3)
        return kernel(q, pos, lens, tables, k, v, layer)

    q_spec, kv_spec = P(None, None, q_axis, None), P(None, None, None, kv_axis, None)
    return jax.shard_map(body, mesh=policy.mesh, check_vma=False,
                         in_specs=(q_spec, P(), P(), P(), kv_spec, kv_spec, P()), out_specs=q_spec)(
        q_RQHK, pos_RQ, lens_R, tables_RP, k_pages, v_pages, layer)


def cache_spec(policy: compute.ComputePolicy) -> P:
    """Layout of the stacked pages: K/V heads as the model's rules place them (tensor)."""
    return P(None, None, None, *policy.spec(("kv_heads", "head_dim")))


def empty_pages(geometry: Any, num_pages: int, page_size: int, dtype: Any, sharding) -> dict:
    """Zeroed pages for `num_pages` usable pages plus the trash page, created in their shards."""
    shape = (geometry.layers, num_pages + 1, page_size, geometry.kv_heads, geometry.head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return {"k": zeros(), "v": zeros()}
