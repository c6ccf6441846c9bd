"""Sequence-parallel causal attention over the `sequence` mesh axis.

Activations arrive sharded on their length axis (`[B, L, H, hd]`, spec
`P(None, "sequence", None, None)` for the manual axis). Two strategies compute the same
function as `zerojax.models.layers.causal_attention` on the unsharded arrays:

  ulysses  DeepSpeed-Ulysses: an all-to-all turns length-sharded Q/K/V into head-sharded
           Q/K/V over the full length, each device runs plain causal attention for H/s
           heads, and a second all-to-all turns the output back. Needs H % s == 0.
           Per device it still builds [L, L] scores (for H/s heads).
  ring     Ring attention: each device keeps its Q block while K/V blocks travel around
           the ring with `ppermute`; an online softmax (running max, running sum, fp32
           accumulator) merges the s blocks. Scores per device are [L/s, L/s] per step.

Both run in a `jax.shard_map` that is manual over the sequence axis only: `data`, `tensor`
and the rest stay automatic (GSPMD), so batch rows sharded over `data` and heads sharded
over `tensor` keep their layout and the whole thing composes with ZeRO and tensor
parallelism inside one compiled step.

Known cost (XLA in jax 0.10.2, CPU): the partitioner does not partition an all-to-all
over the automatic axes of a partially manual region, so Ulysses would all-gather its
operands over any automatic sharding before each all-to-all. The batch axes are therefore
made manual too (`batch_axes`); heads sharded over `tensor` still pay that gather when
tensor and sequence parallelism are combined (correct, more traffic). Ring attention's
`ppermute`s need no such gathers.

Q has H heads, K/V have G heads with G dividing H; query head h uses K/V head h // (H / G)
(Hugging Face's `repeat_kv` order). Scale 1/sqrt(hd), softmax in fp32, output in the
input dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

STRATEGIES = ("ulysses", "ring")


def _check(q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh, axis: str) -> int:
    """Validate shapes against the mesh; return the sequence-axis size."""
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r}; axes: {tuple(mesh.axis_names)}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected q [B, L, H, hd] and k/v [B, L, G, hd]; got shapes "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, length, heads, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, length, head_dim):
        raise ValueError(f"q {q.shape} and k/v {k.shape} disagree on batch, length or head_dim")
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    size = mesh.shape[axis]
    if length % size:
        raise ValueError(f"sequence length {length} is not divisible by the {axis!r} axis "
                         f"size {size}")
    return size


def _spec(axis: str, batch_axes: tuple[str, ...]) -> P:
    return P(batch_axes or None, axis, None, None)


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain causal attention, the same math as `layers.causal_attention`."""
    if q.dtype == jnp.float16:
        # XLA:CPU rejects the fp16 x fp16 -> fp32 dot that attention asks for; run in fp32.
        out = jax.nn.dot_product_attention(*(t.astype(jnp.float32) for t in (q, k, v)),
                                           is_causal=True)
        return out.astype(jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def _run(body, mesh: Mesh, axis: str, q: jax.Array, k: jax.Array, v: jax.Array,
         batch_axes: tuple[str, ...] = ()) -> jax.Array:
    """`body` in a shard_map manual over `axis` (and the batch axes); jitted so eager calls work.

    Rows are independent in attention, so making the batch axes manual too costs nothing
    and keeps XLA from gathering rows over `data` around Ulysses' all-to-alls.
    """
    spec = _spec(axis, batch_axes)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                           axis_names={axis, *batch_axes}, check_vma=False)
    return jax.jit(mapped)(q, k, v)


# ----------------------------------------------------------------------------- Ulysses

def _ulysses_kv_heads(heads: int, kv_heads: int, size: int) -> int:
    """K/V head count to send through the all-to-all: the fewest that `size` divides.

    lcm(G, s) divides H whenever G and s both do, and repeating each K/V head
    lcm(G, s) / G times keeps query head h on (repeated) head h // (H / lcm(G, s)),
    which is a copy of the original head h // (H / G). Only G % s != 0 pays for copies.
    """
    return math.lcm(kv_heads, size) if kv_heads % size else kv_heads


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                      axis: str = "sequence", batch_axes: tuple[str, ...] = ()) -> jax.Array:
    """DeepSpeed-Ulysses causal attention; q [B, L, H, hd], k/v [B, L, G, hd], L sharded on `axis`.

    Each device takes H/s query heads: the query heads of K/V heads j, j + s, j + 2s, ...
    (K/V first repeated to lcm(G, s) heads when s does not divide G). With heads also
    sharded over `tensor`, no extra resharding happens when tensor divides G/s (after any
    repeat); otherwise GSPMD reshards around the all-to-all (correct, more traffic).
    Raises ValueError when H is not divisible by the axis size.
    """
    size = _check(q, k, v, mesh, axis)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % size:
        raise ValueError(f"ulysses sequence parallelism splits attention heads over the "
                         f"{axis!r} axis: {heads} query heads are not divisible by its size "
                         f"{size}; use ring attention or a {axis} size that divides {heads}")
    target = _ulysses_kv_heads(heads, kv_heads, size)
    if target != kv_heads:
        repeat = target // kv_heads
        k = jnp.repeat(k, repeat, axis=2)
        v = jnp.repeat(v, repeat, axis=2)

    group = heads // target                   # query heads per (repeated) K/V head
    per_device = target // size               # K/V heads each device takes

    def body(q, k, v):
        b, chunk, _, head_dim = q.shape
        # Strided head assignment: K/V head g = a * s + j goes to device j with its r query
        # heads. Heads split as (G/s, s, r) keep a tensor sharding of the heads (contiguous,
        # on the leading G/s factor when tensor divides G/s) off the all-to-all's axis.
        q = q.reshape(b, chunk, per_device, size, group, head_dim)
        k = k.reshape(b, chunk, per_device, size, head_dim)
        v = v.reshape(b, chunk, per_device, size, head_dim)
        # Split the s factor of the heads, gather the length: [B, L, G/s, 1, ...].
        q, k, v = (jax.lax.all_to_all(t, axis, split_axis=3, concat_axis=1, tiled=True)
                   for t in (q, k, v))
        length = chunk * size
        out = _local_attention(q.reshape(b, length, per_device * group, head_dim),
                               k.reshape(b, length, per_device, head_dim),
                               v.reshape(b, length, per_device, head_dim))
        out = out.reshape(b, length, per_device, 1, group, head_dim)
        out = jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=3, tiled=True)
        return out.reshape(b, chunk, heads, head_dim)

    return _run(body, mesh, axis, q, k, v, batch_axes)


# ----------------------------------------------------------------------------- ring

def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                   axis: str = "sequence", batch_axes: tuple[str, ...] = ()) -> jax.Array:
    """Ring causal attention; q [B, L, H, hd], k/v [B, L, G, hd], L sharded on `axis`.

    Device j holds query block j; at step i it holds the K/V block of device (j - i) mod s
    and masks with global positions. The block math is rematerialised, so the backward pass
    keeps the per-step carries and K/V blocks (O(L) per device), never per-step scores.
    """
    size = _check(q, k, v, mesh, axis)
    heads, head_dim = q.shape[2], q.shape[3]
    kv_heads = k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    perm = [(j, (j + 1) % size) for j in range(size)]

    def body(q, k, v):
        b, chunk = q.shape[0], q.shape[1]
        me = jax.lax.axis_index(axis)
        # [B, T, H, hd] -> [B, T, G, r, hd]: query head g * r + i uses kv head g.
        q32 = q.astype(jnp.float32).reshape(b, chunk, kv_heads, group, head_dim) * scale
        q_pos = me * chunk + jnp.arange(chunk)

        def attend(carry, k_blk, v_blk, src):
            m, l, acc = carry
            s = jnp.einsum("btgrd,bcgd->bgrtc", q32, k_blk.astype(jnp.float32))
            k_pos = src * chunk + jnp.arange(chunk)
            mask = k_pos[None, :] <= q_pos[:, None]                   # [T, C]
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # The result does not depend on the max; keep it out of autodiff. A row with no
            # visible key yet has m = -inf: use 0 there so nothing becomes NaN.
            m_new = jax.lax.stop_gradient(m_new)
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])                        # masked -> exp(-inf) = 0
            correction = jnp.exp(m - m_safe)                          # m = -inf -> 0
            l = l * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum(
                "bgrtc,bcgd->bgrtd", p, v_blk.astype(jnp.float32))
            return m_new, l, acc

        stats = (b, kv_heads, group, chunk)
        carry = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
                 jnp.zeros((*stats, head_dim), jnp.float32))
        # Step 0: the diagonal block, so every row sees at least itself.
        attend = jax.checkpoint(attend)
        carry = attend(carry, k, v, me)

        def step(state, i):
            carry, k_blk, v_blk = state
            k_blk = jax.lax.ppermute(k_blk, axis, perm)
            v_blk = jax.lax.ppermute(v_blk, axis, perm)
            src = (me - i) % size
            return (attend(carry, k_blk, v_blk, src), k_blk, v_blk), None

        if size > 1:
            (carry, _, _), _ = jax.lax.scan(step, (carry, k, v),
                                            jnp.arange(1, size))
        _, l, acc = carry
        out = acc / l[..., None]                                      # [B, G, r, T, hd]
        out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, chunk, heads, head_dim)
        return out.astype(q.dtype)

    return _run(body, mesh, axis, q, k, v, batch_axes)


# ----------------------------------------------------------------------------- dispatch

def sequence_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh,
                       strategy: str, axis: str = "sequence",
                       batch_axes: tuple[str, ...] = ()) -> jax.Array:
    """Causal attention with the length axis sharded over `axis`: "ulysses" or "ring".

    `batch_axes`: mesh axes the rows are sharded over (made manual as well; their sizes
    must divide the batch).
    """
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, mesh=mesh, axis=axis, batch_axes=batch_axes)
    if strategy == "ring":
        return ring_attention(q, k, v, mesh=mesh, axis=axis, batch_axes=batch_axes)
    raise ValueError(f"unknown sequence-parallel strategy {strategy!r}; choose one of {STRATEGIES}")
