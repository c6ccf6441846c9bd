"""Ragged paged attention: the XLA path and the Pallas kernel (interpret mode) against a
plain per-query softmax, and one ragged call against dense causal attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerojax.inference import paged_attention as pa
from zerojax.kernels import paged_attention as pallas_paged_attention

LAYERS, PAGES, PAGE, G, K, H = 2, 12, 4, 2, 8, 4
RNG = np.random.default_rng(0)
K_PAGES = jnp.asarray(RNG.normal(size=(LAYERS, PAGES, PAGE, G, K)), jnp.float32)
V_PAGES = jnp.asarray(RNG.normal(size=(LAYERS, PAGES, PAGE, G, K)), jnp.float32)


def reference(q_RQHK, pos_RQ, tables_RP, layer):
    """Softmax over each query's visible keys, one query at a time, in float64."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q_RQHK, K_PAGES, V_PAGES))
    out = np.zeros(q.shape)
    for r, table in enumerate(np.asarray(tables_RP)):
        keys = np.concatenate([k_pages[layer, p] for p in table])
        values = np.concatenate([v_pages[layer, p] for p in table])
        for i, p in enumerate(np.asarray(pos_RQ[r])):
            for h in range(H) if p >= 0 else ():
                g = h // (H // G)
                s = keys[:p + 1, g] @ q[r, i, h] / np.sqrt(K)
                w = np.exp(s - s.max())
                out[r, i, h] = (w / w.sum()) @ values[:p + 1, g]
    return out


# Rows: a block at positions 5..9 over 3 pages, a decode-like row, a padding row.
TABLES = jnp.asarray([[3, 5, 7, 0], [1, 2, 0, 0], [9, 8, 6, 4]], jnp.int32)
LENS = jnp.asarray([10, 6, 0], jnp.int32)
POS = jnp.asarray([[5, 6, 7, 8, 9], [5, -1, -1, -1, -1], [-1] * 5], jnp.int32)
Q = jnp.asarray(RNG.normal(size=(3, 5, H, K)), jnp.float32)


@pytest.mark.parametrize("pages_per_iter", [1, 2])
def test_xla_group_attention_matches_the_reference(pages_per_iter):
    got = pa.group_attention_xla(Q, POS, LENS, TABLES, K_PAGES, V_PAGES, jnp.int32(1), pages_per_iter)
    np.testing.assert_allclose(np.asarray(got), reference(Q, POS, TABLES, 1), atol=1e-5, rtol=0)


def test_pallas_kernel_matches_the_xla_path():
    xla = pa.group_attention_xla(Q, POS, LENS, TABLES, K_PAGES, V_PAGES, jnp.int32(0), 2)
    pallas = pallas_paged_attention(Q, POS, LENS, TABLES, K_PAGES, V_PAGES, jnp.int32(0), interpret=True)
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(xla), atol=1e-5, rtol=1e-4)
    half = pallas_paged_attention(Q.astype(jnp.bfloat16), POS, LENS, TABLES, K_PAGES.astype(jnp.bfloat16),
                                  V_PAGES.astype(jnp.bfloat16), jnp.int32(0), interpret=True)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(xla), atol=5e-2, rtol=2e-2)


def test_one_ragged_call_equals_dense_causal_attention():
    """Sequence A (10 tokens) decodes its last token, B prefills 7 tokens in one chunk: one
    call, written into pages, equals causal attention over each whole sequence."""
    lens = {"A": 10, "B": 7}
    q_full = {s: jnp.asarray(RNG.normal(size=(n, H, K)), jnp.float32) for s, n in lens.items()}
    k_full = {s: jnp.asarray(RNG.normal(size=(n, G, K)), jnp.float32) for s, n in lens.items()}
    v_full = {s: jnp.asarray(RNG.normal(size=(n, G, K)), jnp.float32) for s, n in lens.items()}
    pages = {"A": [4, 2, 9], "B": [1, 6]}                        # slots 0 and 1
    k_pages, v_pages = jnp.zeros_like(K_PAGES), jnp.zeros_like(V_PAGES)
    for s in ("A",):                                             # A's first 9 tokens are cached already
        for t in range(9):
            k_pages = k_pages.at[1, pages[s][t // PAGE], t % PAGE].set(k_full[s][t])
            v_pages = v_pages.at[1, pages[s][t // PAGE], t % PAGE].set(v_full[s][t])
    # Flat step: A's token 9, then B's tokens 0..6.
    flat_seq = ["A"] + ["B"] * 7
    flat_pos = [9] + list(range(7))
    q = jnp.stack([q_full[s][p] for s, p in zip(flat_seq, flat_pos)])
    new_k = jnp.stack([k_full[s][p] for s, p in zip(flat_seq, flat_pos)])
    new_v = jnp.stack([v_full[s][p] for s, p in zip(flat_seq, flat_pos)])
    write_page = jnp.asarray([pages[s][p // PAGE] for s, p in zip(flat_seq, flat_pos)])
    write_offset = jnp.asarray([p % PAGE for p in flat_pos])
    k_pages = k_pages.at[1, write_page, write_offset].set(new_k)
    v_pages = v_pages.at[1, write_page, write_offset].set(new_v)
    T = len(flat_pos)
    meta = pa.StepMeta(
        write_page=write_page, write_offset=write_offset,
        block_tables=jnp.asarray([[4, 2, 9], [1, 6, 0]], jnp.int32), kv_lens=jnp.asarray([10, 7], jnp.int32),
        decode_token=jnp.asarray([0, T]), decode_slot=jnp.asarray([0, 0]), decode_pos=jnp.asarray([9, -1]),
        prefill_token=jnp.asarray([[1, 2, 3, 4], [5, 6, 7, T]]), prefill_slot=jnp.asarray([1, 1]),
        prefill_pos=jnp.asarray([[0, 1, 2, 3], [4, 5, 6, -1]]))
    for kernels in ("xla", "pallas"):
        out = pa.ragged_paged_attention(q, k_pages, v_pages, jnp.int32(1), meta, kernels=kernels, pages_per_iter=2)
        dense = {s: jax.nn.dot_product_attention(q_full[s][None], k_full[s][None], v_full[s][None],
                                                 is_causal=True)[0] for s in lens}
        want = jnp.stack([dense[s][p] for s, p in zip(flat_seq, flat_pos)])
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=0, err_msg=kernels)
