"""T5 (Hugging Face `T5ForConditionalGeneration` math): encoder-decoder, stacked scanned layers.

Both T5 v1.0 (`feed_forward_proj` "relu", LM head tied to `shared` with the d_model**-0.5
rescale) and v1.1 ("gated-gelu", untied `lm_head`, no rescale). The layer norm is T5's RMS
form (no mean, no bias); attention is not scaled (T5 folds 1/sqrt(d_kv) into its init) and
gets a learned relative position bias: bidirectional buckets in the encoder, causal ones in
the decoder, one [buckets, heads] table per stack used by every layer (Hugging Face keeps
it in layer 0 and shares the bias it computes). Cross-attention has no position bias.

Param tree (fp32, logical axes in each param's sharding metadata; Le / Ld encoder /
decoder layers, P relative-position buckets):
  shared                                   [V, D]        (vocab, embed)
  encoder.relative_attention_bias          [P, H]        (positions, heads)
  encoder.layers.self_attn_layer_norm      [Le, D]       (layers, embed)
  encoder.layers.q_proj / k_proj / v_proj  [Le, D, H, K] (layers, embed, heads, head_dim)
  encoder.layers.o_proj                    [Le, H, K, D] (layers, heads, head_dim, embed)
  encoder.layers.mlp_layer_norm            [Le, D]       (layers, embed)
  encoder.layers.wi  (or wi_0 and wi_1)    [Le, D, F]    (layers, embed, mlp)
  encoder.layers.wo                        [Le, F, D]    (layers, mlp, embed)
  encoder.final_layer_norm                 [D]           (embed,)
  decoder.*                                as encoder.*, with Ld layers and in each layer also
  decoder.layers.cross_attn_layer_norm     [Ld, D]       (layers, embed)
  decoder.layers.cross_{q,k,v}_proj        [Ld, D, H, K] (layers, embed, heads, head_dim)
  decoder.layers.cross_o_proj              [Ld, H, K, D] (layers, heads, head_dim, embed)
  lm_head                                  [D, V]        (embed, vocab)   absent when tied

`model(batch)` takes `{"input_ids" [B, S], "attention_mask" [B, S] (optional, 1 = token),
"labels" [B, T] (-100 = ignore), "loss_mask" [B, T] (optional, 0 = ignore)}`: the decoder
reads the labels shifted right behind `decoder_start_token_id` (-100 read as the pad id),
as Hugging Face does, and the loss is the mean cross-entropy over counted label tokens.
`greedy_generate` decodes with the encoder run once and a K/V cache in the decoder.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zerojax import compute
from zerojax.models import layers as L


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hugging Face `T5Config` fields and defaults (the subset this model implements).

    `num_decoder_layers` left as None is `num_layers`. `tie_word_embeddings` ties the LM
    head to `shared`; `scale_decoder_outputs` (None: as `tie_word_embeddings`, transformers
    4.x's rule) multiplies the decoder output by d_model**-0.5 before the head, as T5 v1.0 does.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int | None = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        L.check_ints(self, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance",
                     "pad_token_id", "decoder_start_token_id")
        L.check_positive(self, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                         "relative_attention_num_buckets", "relative_attention_max_distance",
                         "layer_norm_epsilon", "initializer_factor")
        if isinstance(self.eos_token_id, (list, tuple)) and len(self.eos_token_id) == 1:
            object.__setattr__(self, "eos_token_id", self.eos_token_id[0])     # HF's one-id list
        if self.eos_token_id is not None and (isinstance(self.eos_token_id, bool)
                                              or not isinstance(self.eos_token_id, int)):
            raise ValueError(f"T5Config.eos_token_id must be one int or None, got {self.eos_token_id!r}")
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        L.check_ints(self, "num_decoder_layers")
        L.check_positive(self, "num_decoder_layers")
        for name in ("tie_word_embeddings", "scale_decoder_outputs"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "scale_decoder_outputs" and value is None):
                raise ValueError(f"T5Config.{name} must be a bool, got {value!r}")
        if self.scale_decoder_outputs is None:
            object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"T5Config.relative_attention_num_buckets must be >= 4, got "
                             f"{self.relative_attention_num_buckets}")
        parts = self.feed_forward_proj.split("-") if isinstance(self.feed_forward_proj, str) else []
        if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5Config.feed_forward_proj must be 'ACT' or 'gated-ACT' (e.g. 'relu', "
                             f"'gated-gelu'), got {self.feed_forward_proj!r}")
        L.activation(self.activation)                # raises on an unsupported name
        for name in ("pad_token_id", "decoder_start_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"T5Config.{name} ({getattr(self, name)}) is outside the vocabulary")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # Hugging Face reads "gated-gelu" as the tanh approximation (T5 v1.1's "gelu_new").
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


# ----------------------------------------------------------------------------- params

def _attention_specs(cfg: T5Config, prefix: str) -> dict[str, L.ParamSpec]:
    D, H, K, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.initializer_factor
    return {   # Hugging Face's init: 1/sqrt(d_kv) of attention scaling folded into q's
        f"{prefix}q_proj": L.ParamSpec((D, H, K), ("embed", "heads", "head_dim"), L.normal(f * (D * K) ** -0.5)),
        f"{prefix}k_proj": L.ParamSpec((D, H, K), ("embed", "heads", "head_dim"), L.normal(f * D ** -0.5)),
        f"{prefix}v_proj": L.ParamSpec((D, H, K), ("embed", "heads", "head_dim"), L.normal(f * D ** -0.5)),
        f"{prefix}o_proj": L.ParamSpec((H, K, D), ("heads", "head_dim", "embed"), L.normal(f * (H * K) ** -0.5)),
    }


def _mlp_specs(cfg: T5Config) -> dict[str, L.ParamSpec]:
    D, F, f = cfg.d_model, cfg.d_ff, cfg.initializer_factor
    w_in = L.normal(f * D ** -0.5)
    ins = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    return {**{n: L.ParamSpec((D, F), ("embed", "mlp"), w_in) for n in ins},
            "wo": L.ParamSpec((F, D), ("mlp", "embed"), L.normal(f * F ** -0.5))}


def encoder_layer_specs(cfg: T5Config) -> dict[str, L.ParamSpec]:
    """Per-layer encoder params (without the leading `layers` axis)."""
    norm = L.ParamSpec((cfg.d_model,), ("embed",), L.ones)
    return {"self_attn_layer_norm": norm, **_attention_specs(cfg, ""), "mlp_layer_norm": norm, **_mlp_specs(cfg)}


def decoder_layer_specs(cfg: T5Config) -> dict[str, L.ParamSpec]:
    """Per-layer decoder params (without the leading `layers` axis)."""
    norm = L.ParamSpec((cfg.d_model,), ("embed",), L.ones)
    return {"self_attn_layer_norm": norm, **_attention_specs(cfg, ""),
            "cross_attn_layer_norm": norm, **_attention_specs(cfg, "cross_"),
            "mlp_layer_norm": norm, **_mlp_specs(cfg)}


EMBED_AXES = ("vocab", "embed")
HEAD_AXES = ("embed", "vocab")
NORM_AXES = ("embed",)
BIAS_AXES = ("positions", "heads")       # relative-position buckets x heads


# ----------------------------------------------------------------------------- math

def relative_position_buckets(relative_BLS: jax.Array, *, bidirectional: bool, num_buckets: int,
                              max_distance: int) -> jax.Array:
    """Hugging Face's `T5Attention._relative_position_bucket` (key minus query position -> bucket).

    Half the buckets are exact small distances, the rest logarithmic up to `max_distance`;
    bidirectional buckets spend half on keys after the query, causal ones see only the past.
    The logarithm is taken in fp32 as torch does, so boundary distances land alike."""
    buckets = jnp.zeros_like(relative_BLS)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_BLS > 0).astype(relative_BLS.dtype) * num_buckets
        distance = jnp.abs(relative_BLS)
    else:
        distance = -jnp.minimum(relative_BLS, 0)
    max_exact = num_buckets // 2
    scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(distance.dtype), num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


def position_bias(table_PH: jax.Array, query_positions_L: jax.Array, key_positions_S: jax.Array,
                  cfg: T5Config, *, bidirectional: bool) -> jax.Array:
    """fp32 attention bias [1, H, L, S] from a stack's relative-position table."""
    relative_LS = key_positions_S[None, :] - query_positions_L[:, None]
    buckets_LS = relative_position_buckets(relative_LS, bidirectional=bidirectional,
                                           num_buckets=cfg.relative_attention_num_buckets,
                                           max_distance=cfg.relative_attention_max_distance)
    return jnp.take(table_PH.astype(jnp.float32), buckets_LS, axis=0).transpose(2, 0, 1)[None]


def attend(q_BLHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, bias: jax.Array | None,
           mask: jax.Array | None) -> jax.Array:
    """Softmax attention without scaling (T5), an fp32 bias added to the fp32 scores, a
    boolean mask (broadcast to [B, H, L, S]) removing keys; softmax in fp32."""
    dtype = q_BLHK.dtype
    if dtype == jnp.float16:        # XLA:CPU rejects the fp16 x fp16 -> fp32 dot (see layers.py)
        q_BLHK, k_BSHK, v_BSHK = (t.astype(jnp.float32) for t in (q_BLHK, k_BSHK, v_BSHK))
    out = jax.nn.dot_product_attention(q_BLHK, k_BSHK, v_BSHK, bias=bias, mask=mask, scale=1.0)
    return out.astype(dtype)


def kv_projection(x_BSD: jax.Array, p: Mapping[str, jax.Array], prefix: str) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, S, H, K] of one attention (prefix "" self, "cross_" cross)."""
    k_BSHK = compute.constrain(L.matmul("bsd,dhk->bshk", x_BSD, p[f"{prefix}k_proj"]), L.BLHK)
    v_BSHK = compute.constrain(L.matmul("bsd,dhk->bshk", x_BSD, p[f"{prefix}v_proj"]), L.BLHK)
    return compute.name(k_BSHK, "key"), compute.name(v_BSHK, "value")


def attention_block(x_BLD: jax.Array, p: Mapping[str, jax.Array], prefix: str,
                    kv: tuple[jax.Array, jax.Array], bias: jax.Array | None, mask: jax.Array | None) -> jax.Array:
    # Pinned layouts: heads over `tensor` (Megatron's column-parallel QKV), length over `sequence`.
    q_BLHK = compute.constrain(L.matmul("bld,dhk->blhk", x_BLD, p[f"{prefix}q_proj"]), L.BLHK)
    out_BLHK = compute.name(attend(compute.name(q_BLHK, "query"), *kv, bias, mask), "attention")
    return compute.name(L.matmul("blhk,hkd->bld", out_BLHK, p[f"{prefix}o_proj"]), "attention_out")


def mlp_block(x_BLD: jax.Array, p: Mapping[str, jax.Array], cfg: T5Config) -> jax.Array:
    act = L.activation(cfg.activation)
    if cfg.is_gated:
        gate_BLF = compute.name(compute.constrain(L.matmul("bld,df->blf", x_BLD, p["wi_0"]), L.BLF), "mlp_gate")
        up_BLF = compute.name(compute.constrain(L.matmul("bld,df->blf", x_BLD, p["wi_1"]), L.BLF), "mlp_up")
        hidden_BLF = act(gate_BLF) * up_BLF
    else:
        up_BLF = compute.name(compute.constrain(L.matmul("bld,df->blf", x_BLD, p["wi"]), L.BLF), "mlp_up")
        hidden_BLF = act(up_BLF)
    return compute.name(L.matmul("blf,fd->bld", compute.name(hidden_BLF, "mlp_hidden"), p["wo"]), "mlp_out")


def encoder_layer(x_BLD: jax.Array, p: Mapping[str, jax.Array], cfg: T5Config, bias: jax.Array,
                  mask: jax.Array | None) -> jax.Array:
    eps = cfg.layer_norm_epsilon
    h_BLD = L.rms_norm(x_BLD, p["self_attn_layer_norm"], eps)
    x_BLD = x_BLD + attention_block(h_BLD, p, "", kv_projection(h_BLD, p, ""), bias, mask)
    return x_BLD + mlp_block(L.rms_norm(x_BLD, p["mlp_layer_norm"], eps), p, cfg)


def decoder_layer(x_BLD: jax.Array, p: Mapping[str, jax.Array], cfg: T5Config, self_bias: jax.Array,
                  self_mask: jax.Array | None, cross_kv: tuple[jax.Array, jax.Array],
                  cross_mask: jax.Array | None, cache: tuple[jax.Array, jax.Array, jax.Array] | None = None
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One decoder layer; returns the new residual stream and the self-attention K/V it used.

    Training passes the whole target (K/V from it); cached decoding passes `cache` = (keys,
    values, position): this step's K/V are written there and the query attends over all of
    it. `cross_kv` is the projection of the encoder output (computed once when decoding)."""
    eps = cfg.layer_norm_epsilon
    h_BLD = L.rms_norm(x_BLD, p["self_attn_layer_norm"], eps)
    k_BSHK, v_BSHK = kv_projection(h_BLD, p, "")
    if cache is not None:
        cache_k, cache_v, index = cache
        k_BSHK = jax.lax.dynamic_update_slice_in_dim(cache_k, k_BSHK.astype(cache_k.dtype), index, axis=1)
        v_BSHK = jax.lax.dynamic_update_slice_in_dim(cache_v, v_BSHK.astype(cache_v.dtype), index, axis=1)
    x_BLD = x_BLD + attention_block(h_BLD, p, "", (k_BSHK, v_BSHK), self_bias, self_mask)
    h_BLD = L.rms_norm(x_BLD, p["cross_attn_layer_norm"], eps)
    x_BLD = x_BLD + attention_block(h_BLD, p, "cross_", cross_kv, None, cross_mask)
    return x_BLD + mlp_block(L.rms_norm(x_BLD, p["mlp_layer_norm"], eps), p, cfg), (k_BSHK, v_BSHK)


def shift_right(labels_BT: jax.Array, cfg: T5Config) -> jax.Array:
    """Decoder inputs: `decoder_start_token_id`, then the labels but the last (-100 read as pad)."""
    labels_BT = jnp.asarray(labels_BT).astype(jnp.int32)
    start = jnp.full_like(labels_BT[:, :1], cfg.decoder_start_token_id)
    shifted = jnp.concatenate([start, labels_BT[:, :-1]], axis=1)
    return jnp.where(shifted == L.IGNORE_INDEX, cfg.pad_token_id, shifted)


def token_loss(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean fp32 cross-entropy over targets that are not -100, their count); none counted: 0."""
    mask_BT = targets_BT != L.IGNORE_INDEX
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    # The target's logit as a masked sum over the vocab (a vocab sharded over `tensor` is
    # reduced locally, then all-reduced as [B, T] numbers), as layers.next_token_loss does.
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, 2)
    target_logit_BT = jnp.sum(jnp.where(vocab_ids == targets_BT[..., None], logits_BTV, 0.0), axis=-1)
    count = jnp.sum(mask_BT.astype(jnp.float32))
    nll = jnp.sum(jnp.where(mask_BT, log_z_BT - target_logit_BT, 0.0))
    return compute.batch_mean(nll, count), count


BATCH_KEYS = ("input_ids", "attention_mask", "labels", "loss_mask")


def check_batch(batch: Mapping[str, Any]) -> None:
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise ValueError(f"unsupported T5 batch keys {unknown}; a batch holds 'input_ids' [B, S], 'labels' "
                         f"[B, T] (-100 = ignore) and optionally 'attention_mask' [B, S], 'loss_mask' [B, T]")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"T5 batch has no {key!r}")
        value = jnp.asarray(batch[key])
        if value.ndim != 2 or not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"{key} must be an integer [batch, length] array, got {value.dtype}{list(value.shape)}")
    for key, like in (("attention_mask", "input_ids"), ("loss_mask", "labels")):
        if key in batch and jnp.shape(batch[key]) != jnp.shape(batch[like]):
            raise ValueError(f"{key} has shape {jnp.shape(batch[key])}, {like} {jnp.shape(batch[like])}")


# ----------------------------------------------------------------------------- modules

class T5Stack(nnx.Module):
    """One side (encoder or decoder): stacked layers, the relative-position table, final norm."""

    def __init__(self, cfg: T5Config, specs: Mapping[str, L.ParamSpec], num_layers: int, *, rngs: nnx.Rngs):
        self.layers = L.StackedLayers(specs, num_layers, rngs=rngs)
        bias_init = L.normal(cfg.initializer_factor * cfg.d_model ** -0.5)
        self.relative_attention_bias = L.make_param(
            L.ParamSpec((cfg.relative_attention_num_buckets, cfg.num_heads), BIAS_AXES, bias_init), rngs)
        self.final_layer_norm = L.make_param(L.ParamSpec((cfg.d_model,), NORM_AXES, L.ones), rngs)

    def table(self) -> jax.Array:
        return compute.for_compute(self.relative_attention_bias[...], BIAS_AXES)

    def final_norm(self, x_BLD: jax.Array, eps: float) -> jax.Array:
        return L.rms_norm(x_BLD, compute.for_compute(self.final_layer_norm[...], NORM_AXES), eps)


class T5(nnx.Module):
    """Encoder-decoder T5; `model(batch)` is `(loss, {"target_tokens": n})`, `model.logits(...)` fp32.

    It has no `embed` / `run_layers` / `head_loss`: pipeline parallelism, which splits one
    stack of layers into stages, refuses it with a ConfigError naming those methods."""

    # Casts and gathers its params per layer through zerojax.compute; the engine must not pre-cast.
    zerojax_casts_per_layer = True

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.shared = L.make_param(
            L.ParamSpec((cfg.vocab_size, cfg.d_model), EMBED_AXES, L.normal(cfg.initializer_factor)), rngs)
        self.encoder = T5Stack(cfg, encoder_layer_specs(cfg), cfg.num_layers, rngs=rngs)
        self.decoder = T5Stack(cfg, decoder_layer_specs(cfg), cfg.num_decoder_layers, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = L.make_param(
                L.ParamSpec((cfg.d_model, cfg.vocab_size), HEAD_AXES, L.normal(cfg.initializer_factor)), rngs)

    def _embed(self, ids_BL: jax.Array) -> jax.Array:
        return compute.constrain(L.embed(compute.for_compute(self.shared[...], EMBED_AXES), ids_BL), L.BLD)

    def encode(self, input_ids_BS: jax.Array, attention_mask_BS: jax.Array | None = None) -> jax.Array:
        """The encoder's output [B, S, D] (final norm included)."""
        cfg = self.cfg
        length = input_ids_BS.shape[1]
        positions = jnp.arange(length)
        bias = position_bias(self.encoder.table(), positions, positions, cfg, bidirectional=True)
        mask = _key_mask(attention_mask_BS)
        x_BSD = L.scan_layers(lambda x, p: encoder_layer(x, p, cfg, bias, mask), self._embed(input_ids_BS),
                              self.encoder.layers.arrays(), L.layer_axes(encoder_layer_specs(cfg)))
        return self.encoder.final_norm(x_BSD, cfg.layer_norm_epsilon)

    def decode(self, decoder_input_ids_BT: jax.Array, encoded_BSD: jax.Array,
               attention_mask_BS: jax.Array | None = None) -> jax.Array:
        """The decoder's output [B, T, D] (final norm included) over a whole target."""
        cfg = self.cfg
        length = decoder_input_ids_BT.shape[1]
        positions = jnp.arange(length)
        bias = position_bias(self.decoder.table(), positions, positions, cfg, bidirectional=False)
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        cross_mask = _key_mask(attention_mask_BS)

        def block(x_BTD, p):
            cross_kv = kv_projection(encoded_BSD, p, "cross_")
            return decoder_layer(x_BTD, p, cfg, bias, causal, cross_kv, cross_mask)[0]

        x_BTD = L.scan_layers(block, self._embed(decoder_input_ids_BT), self.decoder.layers.arrays(),
                              L.layer_axes(decoder_layer_specs(cfg)))
        return self.decoder.final_norm(x_BTD, cfg.layer_norm_epsilon)

    def head_logits(self, x_BTD: jax.Array) -> jax.Array:
        """fp32 logits [B, T, V] from the decoder's output (v1.0's rescale when configured)."""
        cfg = self.cfg
        if cfg.scale_decoder_outputs:
            x_BTD = x_BTD * jnp.asarray(cfg.d_model ** -0.5, x_BTD.dtype)
        if cfg.tie_word_embeddings:
            return L.lm_logits(x_BTD, compute.for_compute(self.shared[...], EMBED_AXES))
        return L.lm_logits(x_BTD, compute.for_compute(self.lm_head[...], HEAD_AXES).T)

    def logits(self, input_ids_BS: jax.Array, decoder_input_ids_BT: jax.Array,
               attention_mask_BS: jax.Array | None = None) -> jax.Array:
        """fp32 logits [B, T, V] of the decoder inputs given the encoder inputs."""
        encoded = self.encode(input_ids_BS, attention_mask_BS)
        return self.head_logits(self.decode(decoder_input_ids_BT, encoded, attention_mask_BS))

    def __call__(self, batch: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean cross-entropy of the labels (decoder fed the labels shifted right), and their count."""
        check_batch(batch)
        labels = jnp.asarray(batch["labels"]).astype(jnp.int32)
        mask = batch.get("attention_mask")
        logits = self.logits(jnp.asarray(batch["input_ids"]), shift_right(labels, self.cfg), mask)
        targets = labels
        if "loss_mask" in batch:
            targets = jnp.where(jnp.asarray(batch["loss_mask"]) != 0, labels, L.IGNORE_INDEX)
        loss, count = token_loss(logits, targets)
        return loss, {"target_tokens": count}

    # ------------------------------------------------------------------------- decoding

    def cross_kv(self, encoded_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every decoder layer's cross-attention keys and values [Ld, B, S, H, K], once."""
        axes = L.layer_axes(decoder_layer_specs(self.cfg))

        def one(_, layer_params):
            return None, kv_projection(encoded_BSD, compute.for_compute(layer_params, axes), "cross_")

        return jax.lax.scan(one, None, self.decoder.layers.arrays())[1]

    def decode_step(self, token_B: jax.Array, index: jax.Array, cache: tuple[jax.Array, jax.Array],
                    cross_kv: tuple[jax.Array, jax.Array], attention_mask_BS: jax.Array | None):
        """fp32 logits [B, V] of one decoder position `index` and the updated self-attention
        cache ([Ld, B, max_len, H, K] keys and values); the layer code is the training one."""
        cfg = self.cfg
        axes = L.layer_axes(decoder_layer_specs(cfg))
        max_len = cache[0].shape[2]
        keys = jnp.arange(max_len)
        bias = position_bias(self.decoder.table(), index[None], keys, cfg, bidirectional=False)
        self_mask = (keys <= index)[None, None, None, :]
        cross_mask = _key_mask(attention_mask_BS)

        def body(x_BLD, layer):
            p, cache_k, cache_v, cross_k, cross_v = layer
            x_BLD, kv = decoder_layer(x_BLD, compute.for_compute(p, axes), cfg, bias, self_mask,
                                      (cross_k, cross_v), cross_mask, (cache_k, cache_v, index))
            return compute.constrain(x_BLD, L.BLD), kv

        x_B1D, cache = jax.lax.scan(body, self._embed(token_B[:, None]),
                                    (self.decoder.layers.arrays(), *cache, *cross_kv))
        x_B1D = self.decoder.final_norm(x_B1D, cfg.layer_norm_epsilon)
        return self.head_logits(x_B1D)[:, 0], cache

    def greedy(self, input_ids_BS: jax.Array, attention_mask_BS: jax.Array | None, max_new_tokens: int,
               eos_token_id: jax.Array) -> tuple[jax.Array, jax.Array]:
        """([B, 1 + max_new_tokens] tokens starting with the decoder start token, steps taken).

        Hugging Face's greedy rule: after a row's EOS it gets the pad id; decoding stops
        when every row has ended or after `max_new_tokens`. `eos_token_id` is a traced
        int (-1: no EOS), so one compiled program serves every EOS."""
        cfg = self.cfg
        batch = input_ids_BS.shape[0]
        encoded = self.encode(input_ids_BS, attention_mask_BS)
        cross_kv = self.cross_kv(encoded)
        shape = (cfg.num_decoder_layers, batch, max_new_tokens, cfg.num_heads, cfg.d_kv)
        cache = (jnp.zeros(shape, cross_kv[0].dtype), jnp.zeros(shape, cross_kv[0].dtype))
        tokens = jnp.full((batch, max_new_tokens + 1), cfg.pad_token_id, jnp.int32)
        tokens = tokens.at[:, 0].set(cfg.decoder_start_token_id)

        def running(state):
            index, _, done, _ = state
            return (index < max_new_tokens) & ~jnp.all(done)

        def step(state):
            index, tokens, done, cache = state
            logits, cache = self.decode_step(tokens[:, index], index, cache, cross_kv, attention_mask_BS)
            new = jnp.where(done, cfg.pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
            done = done | (new == eos_token_id)
            return index + 1, tokens.at[:, index + 1].set(new), done, cache

        start = (jnp.asarray(0, jnp.int32), tokens, jnp.zeros((batch,), bool), cache)
        steps, tokens, _, _ = jax.lax.while_loop(running, step, start)
        return tokens, steps


def _key_mask(attention_mask_BS: jax.Array | None) -> jax.Array | None:
    """[B, 1, 1, S] boolean mask of the keys a query may attend (None: all)."""
    if attention_mask_BS is None:
        return None
    return (jnp.asarray(attention_mask_BS) != 0)[:, None, None, :]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(graphdef, state, input_ids, attention_mask, max_new_tokens, eos_token_id):
    return nnx.merge(graphdef, state).greedy(input_ids, attention_mask, max_new_tokens, eos_token_id)


def greedy_generate(model: T5, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int = 20,
                    eos_token_id: int | None = -1) -> np.ndarray:
    """Greedy decoding as Hugging Face's `generate(do_sample=False, num_beams=1)`: int32
    [B, 1 + n] tokens (the decoder start token, then n <= max_new_tokens generated ones,
    the pad id after a row's EOS). The encoder runs once; the decoder keeps a K/V cache
    (self-attention keys and values grow by one position a step, cross-attention's are
    projected once from the encoder output). `eos_token_id` -1: the config's; None: none."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    eos = model.cfg.eos_token_id if eos_token_id == -1 else eos_token_id
    eos = jnp.asarray(-1 if eos is None else eos, jnp.int32)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    graphdef, state = nnx.split(model)
    tokens, steps = _greedy(graphdef, state, input_ids, jnp.asarray(attention_mask, jnp.int32),
                            max_new_tokens, eos)
    return np.asarray(tokens)[:, :int(steps) + 1]


# ----------------------------------------------------------------------------- `zerojax generate`

def load_for_generation(source: str, *, tag: str | None = None):
    """`(T5 with its weights, tokenizer or None)` from a Hugging Face directory or a zerojax
    checkpoint root holding a T5; None when `source` holds another model (the serving
    engine's business). Weights land on the first device."""
    import json
    import os

    from zerojax import checkpoint
    from zerojax.errors import CheckpointError
    from zerojax.inference import tokenizer as tok

    if os.path.isfile(os.path.join(source, "config.json")):
        with open(os.path.join(source, "config.json")) as f:
            if json.load(f).get("model_type") != "t5":
                return None
        from zerojax import hf
        return hf.load_pretrained(source)[0], tok.for_directory(source)
    try:
        tag = checkpoint.resolve_tag(source, tag)
        meta = checkpoint.read_meta(source, tag)
    except CheckpointError:         # not a readable checkpoint: the serving path says why
        return None
    section, _ = checkpoint.model_section(meta)
    if not section or section.get("type") != "t5":
        return None
    from zerojax.models import build
    abstract = nnx.eval_shape(lambda: build(section, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(params))
    restored = checkpoint.restore_model_params(source, tag, meta, checkpoint.to_nested(target))
    nnx.replace_by_pure_dict(params, checkpoint.from_nested(target, restored))
    found = tok.for_directory(source)
    if found is None and abstract.cfg.vocab_size >= 256:
        found = tok.ByteTokenizer()
    return nnx.merge(graphdef, params, rest), found


def generate_text(model: T5, tokenizer, prompt: str, *, max_new_tokens: int) -> str:
    """The greedy continuation of `prompt` (the encoder input, with the tokenizer's EOS
    appended as T5's tokenizer does), up to the model's EOS."""
    eos = list(getattr(tokenizer, "eos_token_ids", ())[:1])
    ids = np.asarray([list(tokenizer.encode(prompt)) + eos], np.int32)
    generated = [int(t) for t in greedy_generate(model, ids, max_new_tokens=max_new_tokens)[0, 1:]]
    if model.cfg.eos_token_id in generated:
        generated = generated[:generated.index(model.cfg.eos_token_id)]
    return tokenizer.decode(generated)
