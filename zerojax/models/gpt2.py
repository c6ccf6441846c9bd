"""GPT-2 (Hugging Face `GPT2LMHeadModel` math) with stacked, scanned layers.

Param tree (fp32, logical axes in each param's sharding metadata); the LM head is `wte`:
  wte                                 [V, D]        (vocab, embed)
  wpe                                 [P, D]        (positions, embed)
  layers.ln_1_scale / ln_1_bias       [L, D]        (layers, embed)
  layers.q_proj / k_proj / v_proj     [L, D, H, K]  (layers, embed, heads, head_dim)
  layers.q_bias / k_bias / v_bias     [L, H, K]     (layers, heads, head_dim)
  layers.attn_proj                    [L, H, K, D]  (layers, heads, head_dim, embed)
  layers.attn_proj_bias               [L, D]        (layers, embed)
  layers.ln_2_scale / ln_2_bias       [L, D]        (layers, embed)
  layers.c_fc                         [L, D, F]     (layers, embed, mlp)
  layers.c_fc_bias                    [L, F]        (layers, mlp)
  layers.c_proj                       [L, F, D]     (layers, mlp, embed)
  layers.c_proj_bias                  [L, D]        (layers, embed)
  ln_f_scale / ln_f_bias              [D]           (embed,)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from zerojax import compute
from zerojax.models import layers as L


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hugging Face `GPT2Config` fields and defaults (the subset this model implements).

    `n_inner` left as None resolves to `4 * n_embd`.
    """

    vocab_size: int = 50257
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    activation_function: str = "gelu_new"

    def __post_init__(self):
        L.check_ints(self, "vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
        L.check_positive(self, "vocab_size", "n_embd", "n_layer", "n_head", "n_positions",
                         "layer_norm_epsilon", "initializer_range")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        L.check_ints(self, "n_inner")
        L.check_positive(self, "n_inner")
        L.activation(self.activation_function)      # raises on an unsupported name

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def layer_specs(cfg: GPT2Config) -> dict[str, L.ParamSpec]:
    """Per-layer params (without the leading `layers` axis)."""
    D, F, H, K = cfg.n_embd, cfg.n_inner, cfg.n_head, cfg.head_dim
    w = L.normal(cfg.initializer_range)
    # Hugging Face scales the residual output projections by 1/sqrt(2 * n_layer).
    w_out = L.normal(cfg.initializer_range / math.sqrt(2 * cfg.n_layer))
    return {
        "ln_1_scale": L.ParamSpec((D,), ("embed",), L.ones),
        "ln_1_bias": L.ParamSpec((D,), ("embed",), L.zeros),
        "q_proj": L.ParamSpec((D, H, K), ("embed", "heads", "head_dim"), w),
        "k_proj": L.ParamSpec((D, H, K), ("embed", "heads", "head_dim"), w),
        "v_proj": L.ParamSpec((D, H, K), ("embed", "heads", "head_dim"), w),
        "q_bias": L.ParamSpec((H, K), ("heads", "head_dim"), L.zeros),
        "k_bias": L.ParamSpec((H, K), ("heads", "head_dim"), L.zeros),
        "v_bias": L.ParamSpec((H, K), ("heads", "head_dim"), L.zeros),
        "attn_proj": L.ParamSpec((H, K, D), ("heads", "head_dim", "embed"), w_out),
        "attn_proj_bias": L.ParamSpec((D,), ("embed",), L.zeros),
        "ln_2_scale": L.ParamSpec((D,), ("embed",), L.ones),
        "ln_2_bias": L.ParamSpec((D,), ("embed",), L.zeros),
        "c_fc": L.ParamSpec((D, F), ("embed", "mlp"), w),
        "c_fc_bias": L.ParamSpec((F,), ("mlp",), L.zeros),
        "c_proj": L.ParamSpec((F, D), ("mlp", "embed"), w_out),
        "c_proj_bias": L.ParamSpec((D,), ("embed",), L.zeros),
    }


WTE_AXES = ("vocab", "embed")
WPE_AXES = ("positions", "embed")
NORM_AXES = ("embed",)


def attention_block(x_BLD: jax.Array, p: Mapping[str, jax.Array], attend=L.causal_attention) -> jax.Array:
    # Pinned layouts: heads over `tensor` (Megatron's column-parallel QKV), length over `sequence`.
    q_BLHK = compute.constrain(L.matmul("bld,dhk->blhk", x_BLD, p["q_proj"], p["q_bias"]), L.BLHK)
    k_BLHK = compute.constrain(L.matmul("bld,dhk->blhk", x_BLD, p["k_proj"], p["k_bias"]), L.BLHK)
    v_BLHK = compute.constrain(L.matmul("bld,dhk->blhk", x_BLD, p["v_proj"], p["v_bias"]), L.BLHK)
    q_BLHK, k_BLHK, v_BLHK = (compute.name(t, n) for t, n in
                              ((q_BLHK, "query"), (k_BLHK, "key"), (v_BLHK, "value")))
    out_BLHK = compute.name(attend(q_BLHK, k_BLHK, v_BLHK), "attention")
    out_BLD = L.matmul("blhk,hkd->bld", out_BLHK, p["attn_proj"], p["attn_proj_bias"])
    return compute.name(out_BLD, "attention_out")


def mlp_block(x_BLD: jax.Array, p: Mapping[str, jax.Array], act) -> jax.Array:
    up_BLF = compute.name(L.matmul("bld,df->blf", x_BLD, p["c_fc"], p["c_fc_bias"]), "mlp_up")
    h_BLF = compute.constrain(act(up_BLF), L.BLF)
    out_BLD = L.matmul("blf,fd->bld", compute.name(h_BLF, "mlp_hidden"), p["c_proj"], p["c_proj_bias"])
    return compute.name(out_BLD, "mlp_out")


def block(x_BLD: jax.Array, p: Mapping[str, jax.Array], eps: float, act,
          attend=L.causal_attention) -> jax.Array:
    x_BLD = x_BLD + attention_block(L.layer_norm(x_BLD, p["ln_1_scale"], p["ln_1_bias"], eps), p, attend)
    return x_BLD + mlp_block(L.layer_norm(x_BLD, p["ln_2_scale"], p["ln_2_bias"], eps), p, act)


class GPT2(nnx.Module):
    """Causal GPT-2; `model(batch)` is the mean next-token loss, `model.logits(ids)` fp32 logits."""

    # Casts and gathers its params per layer through zerojax.compute; the engine must not pre-cast.
    zerojax_casts_per_layer = True

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        w = L.normal(cfg.initializer_range)
        D = cfg.n_embd
        self.wte = L.make_param(L.ParamSpec((cfg.vocab_size, D), WTE_AXES, w), rngs)
        self.wpe = L.make_param(L.ParamSpec((cfg.n_positions, D), WPE_AXES, w), rngs)
        self.layers = L.StackedLayers(layer_specs(cfg), cfg.n_layer, rngs=rngs)
        self.ln_f_scale = L.make_param(L.ParamSpec((D,), NORM_AXES, L.ones), rngs)
        self.ln_f_bias = L.make_param(L.ParamSpec((D,), NORM_AXES, L.zeros), rngs)

    # The model in three parts — embed, the layer stack, head — so a pipeline can give each
    # stage its slice of `layers` and run the embedding and head on the first and last stage.
    def embed(self, input_ids_BL: jax.Array, positions_BL: jax.Array | None = None) -> jax.Array:
        """Token plus learned position embeddings; positions 0..L-1 unless given (cached decoding)."""
        length = input_ids_BL.shape[1]
        wte_VD = compute.for_compute(self.wte[...], WTE_AXES)
        wpe_PD = compute.for_compute(self.wpe[...], WPE_AXES)
        if positions_BL is not None:
            return compute.constrain(L.embed(wte_VD, input_ids_BL) + L.embed(wpe_PD, positions_BL), L.BLD)
        if length > self.cfg.n_positions:
            raise ValueError(f"sequence length {length} exceeds n_positions ({self.cfg.n_positions})")
        return compute.constrain(L.embed(wte_VD, input_ids_BL) + wpe_PD[None, :length], L.BLD)

    def run_layers(self, x_BLD: jax.Array) -> jax.Array:
        """Every layer this module holds (all of them, or one pipeline stage's slice)."""
        eps, act = self.cfg.layer_norm_epsilon, L.activation(self.cfg.activation_function)
        return L.scan_layers(lambda x, p: block(x, p, eps, act), x_BLD, self.layers.arrays(),
                             L.layer_axes(layer_specs(self.cfg)))

    # The serving protocol (zerojax.inference); see Llama.
    def kv_geometry(self) -> L.KVGeometry:
        cfg = self.cfg
        return L.KVGeometry(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.n_positions, cfg.vocab_size)

    def run_layers_cached(self, x_BLD: jax.Array, positions_BL: jax.Array, kv: Any) -> tuple[jax.Array, Any]:
        del positions_BL                # learned positions entered in `embed`
        eps, act = self.cfg.layer_norm_epsilon, L.activation(self.cfg.activation_function)
        return L.scan_layers_cached(lambda x, p, attend: block(x, p, eps, act, attend), x_BLD,
                                    self.layers.arrays(), L.layer_axes(layer_specs(self.cfg)), kv)

    def _final(self, x_BLD: jax.Array) -> jax.Array:
        scale_D = compute.for_compute(self.ln_f_scale[...], NORM_AXES)
        bias_D = compute.for_compute(self.ln_f_bias[...], NORM_AXES)
        return L.layer_norm(x_BLD, scale_D, bias_D, self.cfg.layer_norm_epsilon)

    def final_hidden(self, x_BLD: jax.Array) -> jax.Array:
        """The last layer's output through `ln_f`: what a head (LM or score) reads."""
        return self._final(x_BLD)

    def head_logits(self, x_BLD: jax.Array) -> jax.Array:
        """fp32 logits [B, L, V] through `ln_f` and the tied head (`wte`)."""
        return L.lm_logits(self._final(x_BLD), compute.for_compute(self.wte[...], WTE_AXES))

    def head_loss(self, x_BLD: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
        wte_VD = compute.for_compute(self.wte[...], WTE_AXES)
        return L.head_loss(self._final(x_BLD), wte_VD, batch, head_is_VD=True)

    def logits(self, input_ids_BL: jax.Array) -> jax.Array:
        """fp32 logits [B, L, V] through the tied head (`wte`)."""
        return self.head_logits(self.run_layers(self.embed(input_ids_BL)))

    def __call__(self, batch: Mapping[str, Any]) -> jax.Array:
        """Scalar fp32 mean cross-entropy of next-token prediction (Hugging Face shift)."""
        L.check_batch(batch)
        return self.head_loss(self.run_layers(self.embed(jnp.asarray(batch["input_ids"]))), batch)
