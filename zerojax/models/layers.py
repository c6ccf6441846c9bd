"""Pieces shared by the reference models: params with logical axes, stacked layers, norms,
rotary embeddings, attention and the next-token loss.

Every op a later kernel may replace (attention, norms) is one small function here, so
plugging in a fused kernel is a one-line change at that function.

Logical axis names (the partition rules map them to mesh axes):
  params      layers, vocab, embed, mlp, heads, kv_heads, head_dim, positions
  activations batch, length, embed, heads, kv_heads, head_dim, mlp, vocab
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from zerojax import compute

PARAM_AXES = ("layers", "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "positions")
ACTIVATION_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab")

BLD = ("batch", "length", "embed")      # residual stream
BLV = ("batch", "length", "vocab")      # logits
BLHK = ("batch", "length", "heads", "head_dim")      # queries (and K/V of multi-head attention)
BLGK = ("batch", "length", "kv_heads", "head_dim")   # grouped K/V
BLF = ("batch", "length", "mlp")        # MLP hidden

IGNORE_INDEX = -100                     # Hugging Face's "no loss here" label

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


# ----------------------------------------------------------------------------- params

@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axis names and initializer of one param (per layer for stacked ones)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: Initializer

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")
        unknown = [a for a in self.axes if a not in PARAM_AXES]
        if unknown:
            raise ValueError(f"unknown logical axes {unknown}; known: {PARAM_AXES}")


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


ones: Initializer = jax.nn.initializers.ones
zeros: Initializer = jax.nn.initializers.zeros


def make_param(spec: ParamSpec, rngs: nnx.Rngs) -> nnx.Param:
    """An fp32 `nnx.Param` carrying its logical axis names as sharding metadata."""
    value = spec.init(rngs.params(), spec.shape, jnp.float32)
    return nnx.Param(value, out_sharding=spec.axes, eager_sharding=False)


class StackedLayers(nnx.Module):
    """The params of all transformer layers, each with a leading `layers` axis.

    One attribute per param name; `arrays()` gives the stacked arrays as a dict, which
    `scan_layers` slices one layer at a time.
    """

    def __init__(self, specs: Mapping[str, ParamSpec], num_layers: int, *, rngs: nnx.Rngs):
        self.names = tuple(specs)
        for name, spec in specs.items():
            stacked = ParamSpec((num_layers, *spec.shape), ("layers", *spec.axes), spec.init)
            setattr(self, name, make_param(stacked, rngs))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


def layer_axes(specs: Mapping[str, ParamSpec]) -> dict[str, tuple[str, ...]]:
    """Per-layer logical axes (without `layers`), the pytree `compute.for_compute` takes."""
    return {name: spec.axes for name, spec in specs.items()}


def scan_layers(block: Callable, x_BLD: jax.Array, stacked: Mapping[str, jax.Array],
                axes: Mapping[str, tuple[str, ...]]) -> jax.Array:
    """Run `block(x_BLD, layer_params)` over the stacked layers with one `lax.scan`.

    Each step brings its layer's params to compute form (dtype; gathered under ZeRO-3),
    is wrapped by the policy's remat, and pins the residual stream's layout. The layer's
    input is named "layer_input" for per-tensor remat policies (blocks name the rest).
    """
    def body(x_BLD, layer_params):
        p = compute.for_compute(layer_params, axes)
        x_BLD = block(compute.name(x_BLD, "layer_input"), p)
        return compute.constrain(x_BLD, BLD), None

    x_BLD, _ = jax.lax.scan(compute.remat(body), x_BLD, dict(stacked))
    return x_BLD


def scan_layers_cached(block: Callable, x_BLD: jax.Array, stacked: Mapping[str, jax.Array],
                       axes: Mapping[str, tuple[str, ...]], kv: Any) -> tuple[jax.Array, Any]:
    """`scan_layers` for cached decoding: `block(x_BLD, layer_params, attend)`.

    `kv` is the serving runtime's paged cache (see `zerojax.inference.paged_attention`):
    `kv.pages` is the stacked K/V of every layer, carried through the scan so each layer
    updates its pages in place, and `kv.attend_layer(pages, i)` gives layer i's attention
    (write this step's K/V, attend over the cached ones). The block is the training block:
    only where attention gets K/V from differs. No remat: there is no backward pass.
    """
    def body(carry, layer):
        x_BLD, pages = carry
        layer_params, index = layer
        attend = kv.attend_layer(pages, index)
        x_BLD = block(x_BLD, compute.for_compute(layer_params, axes), attend)
        return (compute.constrain(x_BLD, BLD), attend.pages), None

    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    (x_BLD, pages), _ = jax.lax.scan(body, (x_BLD, kv.pages), (dict(stacked), jnp.arange(num_layers)))
    return x_BLD, kv.replace_pages(pages)


class KVGeometry(NamedTuple):
    """What a servable model's K/V pages hold: per token, `layers` x `kv_heads` x `head_dim`
    keys and as many values; `max_positions` bounds the context, `vocab_size` the ids."""

    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int
    vocab_size: int


# ----------------------------------------------------------------------------- math

def _pallas() -> bool:
    return compute.current().kernels == "pallas"


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Llama RMSNorm as Hugging Face computes it: normalise in fp32, cast back, then scale."""
    if _pallas():
        from zerojax import fused
        return fused.rms_norm(x, scale, eps)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + eps)).astype(x.dtype)
    return scale * normed


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm computed in fp32 (scale and bias included), cast back to the input dtype."""
    if _pallas():
        from zerojax import fused
        return fused.layer_norm(x, scale, bias, eps)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(variance + eps)
    out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def rope_cos_sin(length: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """fp32 cos/sin tables [length, head_dim] in Hugging Face's layout (frequencies repeated)."""
    return rope_at(jnp.arange(length), head_dim, theta)


def rope_at(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """fp32 cos/sin tables [..., head_dim] for the given token positions (any shape)."""
    inv_freq_K = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq_K
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_BLHK: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding, `x * cos + rotate_half(x) * sin` with tables cast to x's dtype.

    Tables are [L, K] (positions 0..L-1, training) or [B, L, K] (given positions, cached
    decoding)."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos = cos[:, :, None, :].astype(x_BLHK.dtype)
    sin = sin[:, :, None, :].astype(x_BLHK.dtype)
    return x_BLHK * cos + rotate_half(x_BLHK) * sin


def causal_attention(q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array) -> jax.Array:
    """Causal softmax attention scaled by 1/sqrt(head_dim); softmax in fp32.

    K/V may have fewer heads than Q (grouped-query attention): query head h uses K/V
    head h // (H / G), as Hugging Face's `repeat_kv` does. With the length sharded over the
    `sequence` mesh axis the policy's strategy (Ulysses or ring) computes the same function.
    """
    policy = compute.current()
    if policy.mesh is not None and policy.mesh.shape.get("sequence", 1) > 1:
        from zerojax.mesh import BATCH_AXES
        from zerojax.sequence_parallel import sequence_attention
        return sequence_attention(q_BLHK, k_BLGK, v_BLGK, mesh=policy.mesh,
                                  strategy=policy.sequence_parallel, batch_axes=BATCH_AXES)
    if policy.kernels == "pallas":
        from zerojax import fused
        return fused.attention(q_BLHK, k_BLGK, v_BLGK)
    if q_BLHK.dtype == jnp.float16:
        # XLA's attention asks for an fp16 x fp16 -> fp32 dot algorithm that XLA:CPU rejects
        # at compile time; run the fp16 case in fp32 and cast back (fused kernels replace this).
        out = jax.nn.dot_product_attention(*(t.astype(jnp.float32) for t in (q_BLHK, k_BLGK, v_BLGK)),
                                           is_causal=True)
        return out.astype(jnp.float16)
    return jax.nn.dot_product_attention(q_BLHK, k_BLGK, v_BLGK, is_causal=True)


def _recompute_in_backward(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """`fn` whose backward pass keeps only its input and recomputes the rest.

    Autodiff of tanh-GELU would otherwise keep ~6 intermediates of the MLP's widest
    activation per layer (x, x**2, x**3, tanh, ...); recomputing them is element-wise work
    fused into the backward, cheaper than writing and re-reading them (measured in
    benchmarks/NOTES.md). The math runs in fp32 whatever the input dtype: one rounding at
    the end instead of one per intermediate, and XLA:CPU has no bf16 element-wise units."""
    def in_fp32(x):
        return fn(x.astype(jnp.float32)).astype(x.dtype)

    return jax.checkpoint(in_fp32, policy=jax.checkpoint_policies.nothing_saveable)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": _recompute_in_backward(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu_pytorch_tanh": _recompute_in_backward(lambda x: jax.nn.gelu(x, approximate=True)),
    "gelu": _recompute_in_backward(lambda x: jax.nn.gelu(x, approximate=False)),
    "relu": jax.nn.relu,
    "silu": _recompute_in_backward(jax.nn.silu),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def matmul(spec: str, x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """A model projection: `jnp.einsum(spec, x, w) + bias`, for a two-operand spec in which
    every index appears in exactly two of x, w and the result.

    On CPU, bf16 products are computed as bf16 x bf16 -> fp32, forwards and backwards, the
    bias added in fp32 and the sum rounded once: XLA:CPU runs that dot natively (933 vs
    420 GFLOP/s on 2 AVX-512-bf16 cores; a bf16-result dot is upcast first), and the
    bias gradient becomes an fp32 reduction instead of XLA:CPU's slow split bf16 one.
    Elsewhere the compiler already picks the fast form and the plain einsum stays.
    """
    if x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        y = _bf16_product(spec, x, w)
        return (y if bias is None else y + bias.astype(jnp.float32)).astype(x.dtype)
    y = jnp.einsum(spec, x, w)
    return y if bias is None else y + bias


def _fp32_dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_product(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """bf16 x bf16 -> fp32 whose backward dots take the same native form."""
    return _fp32_dot(spec, x, w)


def _bf16_product_fwd(spec, x, w):
    return _fp32_dot(spec, x, w), (x, w)


def _bf16_product_bwd(spec, residuals, g):
    # "x,w->y": dx = "y,w->x", dw = "x,y->w" (each index sits in exactly two operands).
    x, w = residuals
    (xs, ws), ys = spec.split("->")[0].split(","), spec.split("->")[1]
    g = g.astype(jnp.bfloat16)
    return (_fp32_dot(f"{ys},{ws}->{xs}", g, w).astype(x.dtype),
            _fp32_dot(f"{xs},{ys}->{ws}", x, g).astype(w.dtype))


_bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def embed(table_VD: jax.Array, input_ids_BL: jax.Array) -> jax.Array:
    """Token embedding lookup from a table already in compute form."""
    return jnp.take(table_VD, input_ids_BL, axis=0)


def lm_logits(x_BLD: jax.Array, head_VD: jax.Array) -> jax.Array:
    """fp32 logits from the final hidden states and an output table laid out [vocab, embed]."""
    # fp16 x fp16 -> fp32 dots are not supported by XLA:CPU; fp16 logits are upcast after the
    # matmul instead (as Hugging Face does), bf16 and fp32 accumulate in fp32 directly.
    accumulate = None if x_BLD.dtype == jnp.float16 else jnp.float32
    logits_BLV = jnp.einsum("bld,vd->blv", x_BLD, head_VD, preferred_element_type=accumulate)
    return compute.constrain(logits_BLV.astype(jnp.float32), BLV)


# ----------------------------------------------------------------------------- batch and loss

BATCH_KEYS = ("input_ids", "labels", "loss_mask")


def check_batch(batch: Mapping[str, Any]) -> None:
    """Fail loudly on a batch the models would otherwise misread (e.g. an `attention_mask`)."""
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise ValueError(
            f"unsupported batch keys {unknown}; a batch holds 'input_ids' [B, L] and optionally "
            f"'labels' (-100 = ignore) or 'loss_mask' (0/1); mask padding through those")
    if "input_ids" not in batch:
        raise ValueError("batch has no 'input_ids'")
    ids = jnp.asarray(batch["input_ids"])
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer [batch, length] array, got {ids.dtype}{list(ids.shape)}")
    for key in ("labels", "loss_mask"):
        if key in batch and jnp.shape(batch[key]) != ids.shape:
            raise ValueError(f"{key} has shape {jnp.shape(batch[key])}, input_ids {ids.shape}")


def next_token_targets(batch: Mapping[str, Any]) -> jax.Array:
    """[B, L] int32: the token position t predicts (t+1's), IGNORE_INDEX where nothing counts.

    Targets are `labels[:, 1:]` if given, else `input_ids[:, 1:]`; a target counts when it
    is not -100 and (if given) `loss_mask[:, 1:]` is nonzero. The (small) targets are
    shifted left rather than the (large) logits sliced: the logits keep their full length,
    so a sequence-sharded length dimension is never re-laid out.
    """
    source = jnp.asarray(batch["labels"] if "labels" in batch else batch["input_ids"]).astype(jnp.int32)
    ignore = jnp.full_like(source[:, :1], IGNORE_INDEX)
    targets_BL = jnp.concatenate([source[:, 1:], ignore], axis=1)
    if "loss_mask" in batch:
        counted = jnp.asarray(batch["loss_mask"])[:, 1:] != 0
        targets_BL = jnp.where(jnp.concatenate([counted, ignore == 0], axis=1), targets_BL, IGNORE_INDEX)
    return targets_BL


def head_loss(x_BLD: jax.Array, head: jax.Array, batch: Mapping[str, Any], *, head_is_VD: bool) -> jax.Array:
    """Next-token loss from final hidden states and the output table ([V, D] or [D, V]).

    With the Pallas kernels selected and the vocabulary whole on each device, the fused
    linear cross-entropy computes it without materialising the [tokens, vocab] logits.
    """
    policy = compute.current()
    if _pallas() and (policy.mesh is None or policy.spec(("vocab",))[0] is None):
        from zerojax import fused
        return fused.next_token_loss(x_BLD, head, next_token_targets(batch), head_is_VD=head_is_VD)
    return next_token_loss(lm_logits(x_BLD, head if head_is_VD else head.T), batch)


def next_token_loss(logits_BLV: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
    """Mean fp32 cross-entropy of position t predicting token t+1 over counted targets
    (see `next_token_targets`). No counted target gives 0.
    """
    targets_BL = next_token_targets(batch)
    mask_BL = targets_BL != IGNORE_INDEX
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    # The target's logit as a masked sum over the vocab (not a gather): with the vocab
    # sharded over `tensor` this is a local reduction plus an all-reduce of [B, L] numbers,
    # so the full [tokens, vocab] logits are never gathered on one device.
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_BLV.shape, 2)
    target_logit_BL = jnp.sum(jnp.where(vocab_ids == targets_BL[..., None], logits_BLV, 0.0), axis=-1)
    nll_BL = jnp.where(mask_BL, log_z_BL - target_logit_BL, 0.0)
    count = jnp.sum(mask_BL.astype(jnp.float32))
    return compute.batch_mean(jnp.sum(nll_BL), count)


# ----------------------------------------------------------------------------- config checks

def check_positive(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"{type(config).__name__}.{name} must be a positive number, got {value!r}")


def check_ints(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{type(config).__name__}.{name} must be an int, got {value!r}")
