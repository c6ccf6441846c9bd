"""Fused LM head + cross-entropy (Pallas, interpret mode on CPU) against plain jnp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerojax.kernels.cross_entropy import fused_linear_cross_entropy

IGNORE = -100


def ref_loss_sum(hidden, head_DV, labels):
    """Unfused: full fp32 [T, V] logits, logsumexp, target logit; sum over kept tokens."""
    logits = jnp.einsum("td,dv->tv", hidden, head_DV, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    mask = labels != IGNORE
    target = jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(jnp.where(mask, lse - target, 0.0))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(t, d, v, dtype, seed):
    kh, kw, kl, km = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(kh, (t, d)).astype(dtype)
    head = (jax.random.normal(kw, (d, v)) / np.sqrt(d) * 3).astype(dtype)
    labels = jax.random.randint(kl, (t,), 0, v)
    labels = jnp.where(jax.random.uniform(km, (t,)) < 0.25, IGNORE, labels)   # ignored tokens
    return hidden, head, labels.astype(jnp.int32)


# T=37 and V=100 are not multiples of the blocks (16, 32); D=24 is not a power of two
@pytest.mark.parametrize("dtype,tol,transpose", [(jnp.float32, 1e-4, False),
                                                 (jnp.float32, 1e-4, True),
                                                 (jnp.bfloat16, 2e-2, False)])
def test_matches_reference(dtype, tol, transpose):
    hidden, head_DV, labels = _inputs(37, 24, 100, dtype, seed=int(transpose))
    head = head_DV.T if transpose else head_DV

    def fused(h, w):
        total, count = fused_linear_cross_entropy(h, w, labels, transpose_head=transpose,
                                                  block_tokens=16, block_vocab=32, interpret=True)
        return total / count, count

    def ref(h, w):
        return ref_loss_sum(h, w.T if transpose else w, labels) / jnp.sum(labels != IGNORE)

    (loss, count), grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, head)
    loss_ref, grads_ref = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(hidden, head)
    assert count == int(jnp.sum(labels != IGNORE))
    assert rel_err(loss, loss_ref) <= tol, (loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype
        assert rel_err(g, g_ref) <= tol, rel_err(g, g_ref)


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, head, labels = _inputs(8, 16, 40, jnp.float32, seed=3)
    labels = jnp.full_like(labels, IGNORE)
    f = lambda h, w: fused_linear_cross_entropy(h, w, labels, block_tokens=8, block_vocab=16,
                                                interpret=True)[0]
    total, (dh, dw) = jax.value_and_grad(f, argnums=(0, 1))(hidden, head)
    assert float(total) == 0.0 and not np.any(dh) and not np.any(dw)


def test_temp_memory_far_below_unfused():
    """value_and_grad of the fused loss never holds [T, V] fp32 logits; the unfused one does.

    Interpret mode keeps a few head-sized [D, V] buffers (the kernel state of the discharged
    pallas_call), so the sizes are chosen with T >> D, where the logits dominate.
    """
    t, d, v = 1024, 64, 32768      # [T, V] fp32 logits: 128 MiB; the head: 8 MiB
    hidden = jax.ShapeDtypeStruct((t, d), jnp.float32)
    head = jax.ShapeDtypeStruct((d, v), jnp.float32)
    labels = jax.ShapeDtypeStruct((t,), jnp.int32)

    def fused(h, w, lab):
        return fused_linear_cross_entropy(h, w, lab, block_tokens=64, block_vocab=1024,
                                          interpret=True)[0]

    def temp_bytes(f):
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(hidden, head, labels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused_bytes, unfused_bytes = temp_bytes(fused), temp_bytes(ref_loss_sum)
    print(f"\ntemp bytes T={t} D={d} V={v}: fused {fused_bytes:,}  unfused {unfused_bytes:,}  "
          f"logits alone {t * v * 4:,}")
    assert fused_bytes * 8 < unfused_bytes


@pytest.mark.parametrize("transpose", [False, True])
def test_lowers_for_cuda(transpose):
    """Forward and gradient lower through Pallas's Triton backend without a GPU."""
    t, d, v = 48, 64, 1000
    hidden = jnp.ones((t, d), jnp.bfloat16)
    head = jnp.ones((v, d) if transpose else (d, v), jnp.bfloat16)
    labels = jnp.zeros((t,), jnp.int32)

    def loss(h, w):
        total, count = fused_linear_cross_entropy(h, w, labels, transpose_head=transpose,
                                                  interpret=False)
        return total / count

    for f in (loss, jax.grad(loss, argnums=(0, 1))):
        lowered = jax.jit(f).trace(hidden, head).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text().lower()
