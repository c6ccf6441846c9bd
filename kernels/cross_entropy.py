"""Fused LM head + cross-entropy: the `[tokens, vocab]` logits are never materialised.

    loss_sum, count = fused_linear_cross_entropy(hidden, lm_head, labels)
    loss = loss_sum / jnp.maximum(count, 1.0)

Returns the fp32 **sum** of per-token negative log-likelihoods over the tokens whose label
is not `ignore_index`, and that token count (fp32). Returning the sum (not the mean) lets
callers combine shards or micro-batches exactly before dividing. Logits are computed in
fp32 (`hidden @ head` with fp32 accumulation), as `layers.lm_logits` does.

Head layout: `lm_head` is `[D, V]` ("embed", "vocab"; the Llama head) by default; pass
`transpose_head=True` for a `[V, D]` table (GPT-2's tied `wte`). Gradients come back in
the layout (and dtype) given.

Kernels (`jax.custom_vjp`):
- forward, grid over token blocks: loops over vocab blocks with an online log-sum-exp and
  picks the target logit; saves only the per-token LSE [T].
- d_hidden, grid over token blocks: recomputes each logits block, forms
  `(softmax - onehot) * dloss` and accumulates `g @ head_block^T` into [block_tokens, D].
- d_head, grid over vocab blocks: recomputes each logits block per token block and
  accumulates `hidden_block^T @ g` into [D, block_vocab].

Block constraints: `block_tokens` and `block_vocab` are powers of two (≥ 16 for the GPU
lowering, whose dots need 16-wide tiles). Tokens are padded to a multiple of
`block_tokens` (padding is ignored), `D` to a power of two ≥ 16 (zeros; exact), and the
vocab to a multiple of `block_vocab` (zero columns whose logits are masked to -inf); a
vocab that already is a multiple of the block is not copied. Each program keeps
`[block_tokens, D]` and `[D, block_vocab]` tiles on chip: the GPU defaults shrink the
blocks as D grows.
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
_MASKED = -1e30          # finite "-inf": keeps exp(m_old - m_new) free of inf - inf


class _Cfg(NamedTuple):
    ignore_index: int
    transpose_head: bool
    block_tokens: int
    block_vocab: int
    interpret: bool


def _pow2(name: str, n: int) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{name} must be a positive power of two, got {n}")
    return n


def _call(kernel, cfg: _Cfg, grid, in_specs, out_specs, out_shape):
    kwargs = {} if cfg.interpret else {"compiler_params": _backend.compiler_params()}
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=cfg.interpret, **kwargs)


def _full(shape):
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _head_block(head_ref, j, cfg: _Cfg):
    """Vocab block j of the head: [D, bv] (or [bv, D] when transposed)."""
    bv = cfg.block_vocab
    if cfg.transpose_head:
        return head_ref[pl.ds(j * bv, bv), :]
    return head_ref[:, pl.ds(j * bv, bv)]


def _logits(h, w, cfg: _Cfg):
    """fp32 [bt, bv] logits of hidden [bt, D] against a head block."""
    contract = ((1,), (1,)) if cfg.transpose_head else ((1,), (0,))
    return lax.dot_general(h, w, (contract, ((), ())), preferred_element_type=F32)


def _masked_logits(h, w, j, vocab, cfg: _Cfg):
    logits = _logits(h, w, cfg)
    cols = j * cfg.block_vocab + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return jnp.where(cols < vocab, logits, _MASKED), cols


def _grad_logits(h, w, j, labels, lse, scale, vocab, cfg: _Cfg):
    """(softmax - onehot) * dloss for one [bt, bv] block, fp32; zero on masked entries."""
    logits, cols = _masked_logits(h, w, j, vocab, cfg)
    probs = jnp.exp(logits - lse[:, None])
    onehot = (cols == labels[:, None]).astype(F32)
    return (probs - onehot) * scale[:, None]


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(h_ref, labels_ref, head_ref, lse_ref, nll_ref, *, n_vocab_blocks, vocab, cfg):
    h = h_ref[...]
    labels = labels_ref[...]
    bt = h.shape[0]

    def body(j, carry):
        m, s, target = carry
        logits, cols = _masked_logits(h, _head_block(head_ref, j, cfg), j, vocab, cfg)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        target = target + jnp.sum(jnp.where(cols == labels[:, None], logits, 0.0), axis=1)
        return m_new, s, target

    init = (jnp.full((bt,), _MASKED, F32), jnp.zeros((bt,), F32), jnp.zeros((bt,), F32))
    m, s, target = lax.fori_loop(0, n_vocab_blocks, body, init)
    lse = m + jnp.log(s)
    lse_ref[...] = lse
    nll_ref[...] = jnp.where(labels != cfg.ignore_index, lse - target, 0.0)


def _dhidden_kernel(h_ref, labels_ref, lse_ref, scale_ref, head_ref, dh_ref, *,
                    n_vocab_blocks, vocab, cfg):
    h = h_ref[...]
    labels, lse, scale = labels_ref[...], lse_ref[...], scale_ref[...]
    # transposed head [bv, D]: g @ w; plain head [D, bv]: g @ w^T
    contract = ((1,), (0,)) if cfg.transpose_head else ((1,), (1,))

    def body(j, acc):
        w = _head_block(head_ref, j, cfg)
        g = _grad_logits(h, w, j, labels, lse, scale, vocab, cfg).astype(w.dtype)
        return acc + lax.dot_general(g, w, (contract, ((), ())), preferred_element_type=F32)

    acc = lax.fori_loop(0, n_vocab_blocks, body, jnp.zeros(h.shape, F32))
    dh_ref[...] = acc.astype(dh_ref.dtype)


def _dhead_kernel(h_ref, labels_ref, lse_ref, scale_ref, head_ref, dw_ref, *,
                  n_token_blocks, vocab, cfg):
    j = pl.program_id(0)
    w = head_ref[...]
    bt = cfg.block_tokens

    def body(i, acc):
        rows = pl.ds(i * bt, bt)
        h = h_ref[rows, :]
        g = _grad_logits(h, w, j, labels_ref[rows], lse_ref[rows], scale_ref[rows], vocab, cfg)
        g = g.astype(h.dtype)
        lhs, rhs = (g, h) if cfg.transpose_head else (h, g)   # [bv, D] += g^T h; [D, bv] += h^T g
        return acc + lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=F32)

    acc = lax.fori_loop(0, n_token_blocks, body, jnp.zeros(w.shape, F32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


# ----------------------------------------------------------------------------- wrappers

def _padded(hidden, head, labels, cfg: _Cfg):
    """Pad tokens, D and vocab to the kernel's tile multiples (no copy when already there)."""
    t, d = hidden.shape
    vocab = head.shape[0] if cfg.transpose_head else head.shape[1]
    bt, bv = cfg.block_tokens, cfg.block_vocab
    t_pad, d_pad, v_pad = pl.cdiv(t, bt) * bt, max(16, pl.next_power_of_2(d)), pl.cdiv(vocab, bv) * bv
    if (t_pad, d_pad) != (t, d):
        hidden = jnp.pad(hidden, ((0, t_pad - t), (0, d_pad - d)))
    if t_pad != t:
        labels = jnp.pad(labels, (0, t_pad - t), constant_values=cfg.ignore_index)
    head_pad = ((0, v_pad - vocab), (0, d_pad - d)) if cfg.transpose_head else \
        ((0, d_pad - d), (0, v_pad - vocab))
    if (d_pad, v_pad) != (d, vocab):
        head = jnp.pad(head, head_pad)
    return hidden, head, labels, vocab


def _token_specs(bt, d_pad):
    return pl.BlockSpec((bt, d_pad), lambda i: (i, 0)), pl.BlockSpec((bt,), lambda i: (i,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_ce(hidden, head, labels, cfg: _Cfg):
    return _ce_fwd(hidden, head, labels, cfg)[0]


def _ce_fwd(hidden, head, labels, cfg: _Cfg):
    h, w, lab, vocab = _padded(hidden, head, labels, cfg)
    t_pad, d_pad = h.shape
    hspec, vspec = _token_specs(cfg.block_tokens, d_pad)
    kernel = functools.partial(_fwd_kernel, n_vocab_blocks=_n_vocab_blocks(w, cfg), vocab=vocab,
                               cfg=cfg)
    lse, nll = _call(kernel, cfg, (t_pad // cfg.block_tokens,), [hspec, vspec, _full(w.shape)],
                     [vspec, vspec], [jax.ShapeDtypeStruct((t_pad,), F32)] * 2)(h, lab, w)
    return jnp.sum(nll), (hidden, head, labels, lse)


def _n_vocab_blocks(w, cfg: _Cfg) -> int:
    v_pad = w.shape[0] if cfg.transpose_head else w.shape[1]
    return v_pad // cfg.block_vocab


def _ce_bwd(cfg: _Cfg, res, dloss):
    hidden, head, labels, lse = res
    t, d = hidden.shape
    h, w, lab, vocab = _padded(hidden, head, labels, cfg)
    t_pad, d_pad = h.shape
    bt, bv = cfg.block_tokens, cfg.block_vocab
    scale = jnp.where(lab != cfg.ignore_index, dloss.astype(F32), 0.0)
    hspec, vspec = _token_specs(bt, d_pad)
    nv = _n_vocab_blocks(w, cfg)

    dh = _call(functools.partial(_dhidden_kernel, n_vocab_blocks=nv, vocab=vocab, cfg=cfg),
               cfg, (t_pad // bt,), [hspec, vspec, vspec, vspec, _full(w.shape)], hspec,
               jax.ShapeDtypeStruct(h.shape, hidden.dtype))(h, lab, lse, scale, w)

    wspec = (pl.BlockSpec((bv, d_pad), lambda j: (j, 0)) if cfg.transpose_head
             else pl.BlockSpec((d_pad, bv), lambda j: (0, j)))
    dw = _call(functools.partial(_dhead_kernel, n_token_blocks=t_pad // bt, vocab=vocab, cfg=cfg),
               cfg, (nv,), [_full(h.shape), _full((t_pad,)), _full((t_pad,)), _full((t_pad,)), wspec],
               wspec, jax.ShapeDtypeStruct(w.shape, head.dtype))(h, lab, lse, scale, w)

    dw = dw[:vocab, :d] if cfg.transpose_head else dw[:d, :vocab]
    return dh[:t, :d], dw, None


_fused_ce.defvjp(_ce_fwd, _ce_bwd)


def _default_blocks(d: int) -> tuple[int, int]:
    d_pad = max(16, pl.next_power_of_2(d))
    vocab = max(16, min(256, pl.next_power_of_2(32768 // d_pad + 1) // 2))
    return 32, vocab


def fused_linear_cross_entropy(hidden: jax.Array, lm_head: jax.Array, labels: jax.Array, *,
                               ignore_index: int = -100, transpose_head: bool = False,
                               block_tokens: int | None = None, block_vocab: int | None = None,
                               interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of NLL over non-ignored tokens, their count), both fp32 scalars.

    hidden [..., D] (compute dtype; leading dims are flattened to tokens), lm_head [D, V]
    (or [V, D] with `transpose_head=True`), labels [...] int (already shifted: label t is
    the target of hidden t). See the module docstring for blocks and layout.
    """
    d = hidden.shape[-1]
    bt_default, bv_default = _default_blocks(d)
    cfg = _Cfg(int(ignore_index), bool(transpose_head),
               _pow2("block_tokens", block_tokens or bt_default),
               _pow2("block_vocab", block_vocab or bv_default),
               _backend.resolve_interpret(interpret))
    head_d = lm_head.shape[1] if transpose_head else lm_head.shape[0]
    if lm_head.ndim != 2 or head_d != d:
        raise ValueError(f"lm_head {lm_head.shape} does not match hidden dim {d} "
                         f"(transpose_head={transpose_head})")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {labels.shape} vs hidden {hidden.shape}")
    hidden = hidden.reshape(-1, d)
    labels = labels.reshape(-1).astype(jnp.int32)
    loss_sum = _fused_ce(hidden, lm_head, labels, cfg)
    count = jnp.sum((labels != ignore_index).astype(F32))
    return loss_sum, count
