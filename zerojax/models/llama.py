"""Llama (Hugging Face `LlamaForCausalLM` math) with stacked, scanned layers.

Param tree (fp32, logical axes in each param's sharding metadata):
  embed_tokens                     [V, D]        (vocab, embed)
  layers.input_layernorm           [L, D]        (layers, embed)
  layers.q_proj                    [L, D, H, K]  (layers, embed, heads, head_dim)
  layers.k_proj / layers.v_proj    [L, D, G, K]  (layers, embed, kv_heads, head_dim)
  layers.o_proj                    [L, H, K, D]  (layers, heads, head_dim, embed)
  layers.post_attention_layernorm  [L, D]        (layers, embed)
  layers.gate_proj / layers.up_proj [L, D, F]    (layers, embed, mlp)
  layers.down_proj                 [L, F, D]     (layers, mlp, embed)
  norm                             [D]           (embed,)
  lm_head                          [D, V]        (embed, vocab)   absent when tied
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from zerojax import compute
from zerojax.models import layers as L


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hugging Face `LlamaConfig` fields and defaults (the subset this model implements).

    `num_key_value_heads` and `head_dim` left as None resolve to `num_attention_heads`
    and `hidden_size // num_attention_heads`, as Hugging Face does.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"

    def __post_init__(self):
        L.check_ints(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings")
        L.check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "max_position_embeddings", "rms_norm_eps",
                         "rope_theta", "initializer_range")
        heads = self.num_attention_heads
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", heads)
        L.check_ints(self, "num_key_value_heads")
        L.check_positive(self, "num_key_value_heads")
        if heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({heads}), or set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // heads)
        L.check_ints(self, "head_dim")
        L.check_positive(self, "head_dim")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; Llama uses 'silu'")


def layer_specs(cfg: LlamaConfig) -> dict[str, L.ParamSpec]:
    """Per-layer params (without the leading `layers` axis)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w = L.normal(cfg.initializer_range)
    return {
        "input_layernorm": L.ParamSpec((D,), ("embed",), L.ones),
        "q_proj": L.ParamSpec((D, H, K), ("embed", "heads", "head_dim"), w),
        "k_proj": L.ParamSpec((D, G, K), ("embed", "kv_heads", "head_dim"), w),
        "v_proj": L.ParamSpec((D, G, K), ("embed", "kv_heads", "head_dim"), w),
        "o_proj": L.ParamSpec((H, K, D), ("heads", "head_dim", "embed"), w),
        "post_attention_layernorm": L.ParamSpec((D,), ("embed",), L.ones),
        "gate_proj": L.ParamSpec((D, F), ("embed", "mlp"), w),
        "up_proj": L.ParamSpec((D, F), ("embed", "mlp"), w),
        "down_proj": L.ParamSpec((F, D), ("mlp", "embed"), w),
    }


EMBED_AXES = ("vocab", "embed")
NORM_AXES = ("embed",)
HEAD_AXES = ("embed", "vocab")


def attention_block(x_BLD: jax.Array, p: Mapping[str, jax.Array], cos_LK: jax.Array,
                    sin_LK: jax.Array, attend=L.causal_attention) -> jax.Array:
    # Pinned layouts: heads over `tensor` (Megatron's column-parallel QKV), length over `sequence`.
    q_BLHK = compute.constrain(L.matmul("bld,dhk->blhk", x_BLD, p["q_proj"]), L.BLHK)
    k_BLGK = compute.constrain(L.matmul("bld,dgk->blgk", x_BLD, p["k_proj"]), L.BLGK)
    v_BLGK = compute.constrain(L.matmul("bld,dgk->blgk", x_BLD, p["v_proj"]), L.BLGK)
    q_BLHK = compute.name(L.apply_rope(q_BLHK, cos_LK, sin_LK), "query")
    k_BLGK = compute.name(L.apply_rope(k_BLGK, cos_LK, sin_LK), "key")
    out_BLHK = compute.name(attend(q_BLHK, k_BLGK, compute.name(v_BLGK, "value")), "attention")
    return compute.name(L.matmul("blhk,hkd->bld", out_BLHK, p["o_proj"]), "attention_out")


def mlp_block(x_BLD: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    gate_BLF = compute.name(compute.constrain(L.matmul("bld,df->blf", x_BLD, p["gate_proj"]), L.BLF),
                            "mlp_gate")
    up_BLF = compute.name(compute.constrain(L.matmul("bld,df->blf", x_BLD, p["up_proj"]), L.BLF), "mlp_up")
    hidden_BLF = compute.name(L.activation("silu")(gate_BLF) * up_BLF, "mlp_hidden")
    return compute.name(L.matmul("blf,fd->bld", hidden_BLF, p["down_proj"]), "mlp_out")


def decoder_layer(x_BLD: jax.Array, p: Mapping[str, jax.Array], cos_LK: jax.Array,
                  sin_LK: jax.Array, eps: float, attend=L.causal_attention) -> jax.Array:
    x_BLD = x_BLD + attention_block(L.rms_norm(x_BLD, p["input_layernorm"], eps), p, cos_LK, sin_LK,
                                    attend)
    return x_BLD + mlp_block(L.rms_norm(x_BLD, p["post_attention_layernorm"], eps), p)


class Llama(nnx.Module):
    """Causal Llama; `model(batch)` is the mean next-token loss, `model.logits(ids)` fp32 logits."""

    # Casts and gathers its params per layer through zerojax.compute; the engine must not pre-cast.
    zerojax_casts_per_layer = True

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w = L.normal(cfg.initializer_range)
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed_tokens = L.make_param(L.ParamSpec((V, D), EMBED_AXES, w), rngs)
        self.layers = L.StackedLayers(layer_specs(cfg), cfg.num_hidden_layers, rngs=rngs)
        self.norm = L.make_param(L.ParamSpec((D,), NORM_AXES, L.ones), rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = L.make_param(L.ParamSpec((D, V), HEAD_AXES, w), rngs)

    # The model in three parts — embed, the layer stack, head — so a pipeline can give each
    # stage its slice of `layers` and run the embedding and head on the first and last stage.
    def embed(self, input_ids_BL: jax.Array, positions_BL: jax.Array | None = None) -> jax.Array:
        del positions_BL                # rotary: positions enter in the attention
        table_VD = compute.for_compute(self.embed_tokens[...], EMBED_AXES)
        return compute.constrain(L.embed(table_VD, input_ids_BL), L.BLD)

    def run_layers(self, x_BLD: jax.Array) -> jax.Array:
        """Every layer this module holds (all of them, or one pipeline stage's slice)."""
        cfg = self.cfg
        cos_LK, sin_LK = L.rope_cos_sin(x_BLD.shape[1], cfg.head_dim, cfg.rope_theta)

        def block(x_BLD, p):
            return decoder_layer(x_BLD, p, cos_LK, sin_LK, cfg.rms_norm_eps)

        return L.scan_layers(block, x_BLD, self.layers.arrays(), L.layer_axes(layer_specs(cfg)))

    # The serving protocol (zerojax.inference): the K/V a page holds, and the layer stack
    # over a ragged batch of new tokens at given positions, K/V read from and written to pages.
    def kv_geometry(self) -> L.KVGeometry:
        cfg = self.cfg
        return L.KVGeometry(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                            cfg.max_position_embeddings, cfg.vocab_size)

    def run_layers_cached(self, x_BLD: jax.Array, positions_BL: jax.Array, kv: Any) -> tuple[jax.Array, Any]:
        cfg = self.cfg
        cos_BLK, sin_BLK = L.rope_at(positions_BL, cfg.head_dim, cfg.rope_theta)

        def block(x_BLD, p, attend):
            return decoder_layer(x_BLD, p, cos_BLK, sin_BLK, cfg.rms_norm_eps, attend)

        return L.scan_layers_cached(block, x_BLD, self.layers.arrays(), L.layer_axes(layer_specs(cfg)), kv)

    def _final(self, x_BLD: jax.Array) -> tuple[jax.Array, jax.Array, bool]:
        """Final-norm hidden states, the output table, and whether it is laid out [V, D]."""
        norm_D = compute.for_compute(self.norm[...], NORM_AXES)
        x_BLD = L.rms_norm(x_BLD, norm_D, self.cfg.rms_norm_eps)
        if self.cfg.tie_word_embeddings:
            return x_BLD, compute.for_compute(self.embed_tokens[...], EMBED_AXES), True
        return x_BLD, compute.for_compute(self.lm_head[...], HEAD_AXES), False

    def final_hidden(self, x_BLD: jax.Array) -> jax.Array:
        """The last layer's output through the final norm: what a head (LM or score) reads."""
        return self._final(x_BLD)[0]

    def head_logits(self, x_BLD: jax.Array) -> jax.Array:
        """fp32 logits [B, L, V] from the last layer's output (final norm included)."""
        x_BLD, head, is_VD = self._final(x_BLD)
        return L.lm_logits(x_BLD, head if is_VD else head.T)

    def head_loss(self, x_BLD: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
        x_BLD, head, is_VD = self._final(x_BLD)
        return L.head_loss(x_BLD, head, batch, head_is_VD=is_VD)

    def logits(self, input_ids_BL: jax.Array) -> jax.Array:
        """fp32 logits [B, L, V]."""
        return self.head_logits(self.run_layers(self.embed(input_ids_BL)))

    def __call__(self, batch: Mapping[str, Any]) -> jax.Array:
        """Scalar fp32 mean cross-entropy of next-token prediction (Hugging Face shift)."""
        L.check_batch(batch)
        return self.head_loss(self.run_layers(self.embed(jnp.asarray(batch["input_ids"]))), batch)
