"""Flash attention kernel (Pallas interpret mode on CPU) vs a plain-jnp reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerojax.kernels.flash_attention import flash_attention

BATCH, HEADS = 2, 4


def reference_attention(q, k, v, causal):
    """Plain attention in fp32: einsum scores, mask, softmax, einsum with V."""
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    q_len, kv_len = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    if causal:
        keep = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]
        scores = jnp.where(keep, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhls,bshd->blhd", probs, v)


def _inputs(q_len, kv_len, kv_heads, head_dim, dtype, seed):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (BATCH, q_len, HEADS, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (BATCH, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (BATCH, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    cot = jax.random.normal(kc, (BATCH, q_len, HEADS, head_dim), jnp.float32).astype(dtype)
    return q, k, v, cot


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Pairwise over (length, kv heads, causal, dtype, blocks) rather than the full matrix.
CASES = [
    # q_len, kv_len, kv_heads, head_dim, causal, dtype, block_q, block_k
    pytest.param(32, 32, 4, 16, True, jnp.float32, 16, 16, id="mha-causal-L32"),
    pytest.param(40, 40, 2, 16, True, jnp.float32, 16, 16, id="gqa2-causal-L40"),
    pytest.param(17, 17, 1, 16, False, jnp.float32, 16, 16, id="mqa-full-L17"),
    pytest.param(32, 32, 1, 16, False, jnp.float32, 16, 16, id="mqa-full-L32"),
    pytest.param(40, 40, 2, 16, True, jnp.float32, 16, 32, id="gqa2-causal-L40-bk32"),
    pytest.param(40, 40, 4, 16, False, jnp.float32, 32, 16, id="mha-full-L40-bq32"),
    pytest.param(17, 40, 2, 24, True, jnp.float32, 32, 16, id="cross-len-causal-d24"),
    pytest.param(40, 40, 2, 16, True, jnp.bfloat16, 16, 16, id="bf16-gqa2-causal-L40"),
    pytest.param(17, 17, 4, 16, False, jnp.bfloat16, 16, 16, id="bf16-mha-full-L17"),
]


@pytest.mark.parametrize("q_len,kv_len,kv_heads,head_dim,causal,dtype,block_q,block_k", CASES)
def test_forward_and_gradients_match_reference(q_len, kv_len, kv_heads, head_dim, causal, dtype,
                                               block_q, block_k):
    q, k, v, cot = _inputs(q_len, kv_len, kv_heads, head_dim, dtype, seed=q_len + kv_heads)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2

    def kernel(q, k, v):
        return flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k,
                               interpret=True)

    @jax.jit
    def run(q, k, v, cot):
        out, vjp = jax.vjp(kernel, q, k, v)
        return out, vjp(cot)

    @jax.jit
    def run_reference(q, k, v, cot):
        f32 = [t.astype(jnp.float32) for t in (q, k, v)]
        out, vjp = jax.vjp(lambda *a: reference_attention(*a, causal), *f32)
        return out, vjp(cot.astype(jnp.float32))

    out, grads = run(q, k, v, cot)
    ref_out, ref_grads = run_reference(q, k, v, cot)
    assert out.dtype == dtype and out.shape == q.shape
    assert _rel(out, ref_out) <= tol
    for name, g, ref_g, x in zip("qkv", grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert _rel(g, ref_g) <= tol, (name, _rel(g, ref_g))


def test_block_sizes_must_be_powers_of_two():
    q, k, v, _ = _inputs(16, 16, 2, 16, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, k, v, block_q=24, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_gpu_with_triton(dtype):
    """The compiled (non-interpret) kernels lower for CUDA through Pallas's Triton backend."""
    for causal, length in [(True, 40), (False, 40), (True, 64), (False, 64)]:
        q = jax.ShapeDtypeStruct((BATCH, length, HEADS, 64), dtype)
        kv = jax.ShapeDtypeStruct((BATCH, length, 2, 64), dtype)

        def forward(q, k, v, causal=causal):
            return flash_attention(q, k, v, causal=causal, block_q=32, block_k=16, interpret=False)

        def loss(q, k, v):
            return forward(q, k, v).astype(jnp.float32).sum()

        fwd_text = jax.jit(forward).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
        grad_fn = jax.grad(loss, argnums=(0, 1, 2))
        bwd_text = jax.jit(grad_fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
        assert fwd_text.count("__gpu$xla.gpu.triton") == 1
        assert bwd_text.count("__gpu$xla.gpu.triton") == 3  # forward, dK/dV, dQ
