"""Fused kernels (`zerojax.kernels`) run per shard under the current compute policy.

Under a sharded jit, GSPMD would gather a Pallas kernel's inputs and run it whole on
every device; a `shard_map` over the mesh makes each device run the kernel on its own
shard instead. Attention, norms and the loss are independent across rows (attention also
across heads), so the per-shard call computes the same function as long as what a kernel
reduces over is whole on each device: the embedding dimension for the norms, the length
for attention (sequence parallelism keeps its own attention), the vocabulary for the loss
(the model uses the vocab-parallel XLA loss when `tensor` splits it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zerojax import compute
from zerojax.models.layers import BLD, BLGK, BLHK, IGNORE_INDEX


def _per_shard(fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=compute.current().mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def _mesh_axes(spec: P) -> tuple[str, ...]:
    return tuple(a for entry in spec if entry is not None
                 for a in ((entry,) if isinstance(entry, str) else entry))


def attention(q_BLHK, k_BLGK, v_BLGK):
    """Causal flash attention on each device's rows and heads."""
    from zerojax.kernels import flash_attention

    policy = compute.current()
    if policy.mesh is None:
        return flash_attention(q_BLHK, k_BLGK, v_BLGK, causal=True)
    q_spec, kv_spec = policy.spec(BLHK), policy.spec(BLGK)
    heads, kv_heads = q_BLHK.shape[2], k_BLGK.shape[2]
    q_head_axis = q_spec[2] if isinstance(q_spec[2], str) else None

    def body(q, k, v):
        if q_head_axis is not None and kv_spec[2] is None and q.shape[2] < heads:
            # Fewer K/V heads than tensor ranks: K/V are whole on every rank while the query
            # heads are split; keep the one K/V head this rank's query heads read.
            first = jax.lax.axis_index(q_head_axis) * q.shape[2]
            k = jax.lax.dynamic_slice_in_dim(k, first // (heads // kv_heads), 1, axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, first // (heads // kv_heads), 1, axis=2)
        return flash_attention(q, k, v, causal=True)

    return _per_shard(body, (q_spec, kv_spec, kv_spec), q_spec)(q_BLHK, k_BLGK, v_BLGK)


def rms_norm(x_BLD, scale_D, eps):
    from zerojax.kernels import rms_norm as kernel

    if compute.current().mesh is None:
        return kernel(x_BLD, scale_D, eps=eps)
    spec = compute.current().spec(BLD)
    return _per_shard(lambda x, w: kernel(x, w, eps=eps), (spec, P()), spec)(x_BLD, scale_D)


def layer_norm(x_BLD, scale_D, bias_D, eps):
    from zerojax.kernels import layer_norm as kernel

    if compute.current().mesh is None:
        return kernel(x_BLD, scale_D, bias_D, eps=eps)
    spec = compute.current().spec(BLD)
    return _per_shard(lambda x, w, b: kernel(x, w, b, eps=eps), (spec, P(), P()), spec)(x_BLD, scale_D, bias_D)


def next_token_loss(x_BLD, head, targets_BL, *, head_is_VD: bool):
    """Mean next-token loss by the fused linear cross-entropy: no [tokens, vocab] logits."""
    from zerojax.kernels import fused_linear_cross_entropy

    def local(x, w, t):
        return fused_linear_cross_entropy(x, w, t, ignore_index=IGNORE_INDEX, transpose_head=head_is_VD)

    policy = compute.current()
    if policy.mesh is None:
        total, count = local(x_BLD, head, targets_BL)
    else:
        x_spec = policy.spec(BLD)
        t_spec = P(*x_spec[:2])
        axes = _mesh_axes(x_spec)

        def summed(x, w, t):
            total, count = local(x, w, t)
            return jax.lax.psum(total, axes), jax.lax.psum(count, axes)

        total, count = _per_shard(summed, (x_spec, P(), t_spec), (P(), P()))(x_BLD, head, targets_BL)
    return compute.batch_mean(total, count)
