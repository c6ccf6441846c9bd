"""Sequence-parallel attention (Ulysses and ring) against plain causal attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zerojax.mesh import AXES
from zerojax.sequence_parallel import ring_attention, sequence_attention, ulysses_attention

STRATEGIES = ("ulysses", "ring")


def make_mesh(data=1, sequence=1, tensor=1):
    n = data * sequence * tensor
    devices = np.asarray(jax.devices()[:n]).reshape(1, 1, data, sequence, tensor)
    return Mesh(devices, AXES)


def qkv(B=2, L=32, H=4, G=4, hd=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((B, L, H, hd), (B, L, G, hd), (B, L, G, hd)))


def cotangent(shape):
    return jnp.asarray(np.random.default_rng(1).standard_normal(shape, np.float32))


@jax.jit
def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


@jax.jit
def reference_grads(q, k, v, cot):
    return jax.grad(loss_fn(reference, cot), argnums=(0, 1, 2))(q, k, v)


def place(mesh, spec, *arrays):
    return tuple(jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays)


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def loss_fn(attn, cot):
    return lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * cot)


def out_and_grads(attn, q, k, v, cot):
    """One compiled function: the output and d<out, cot>/d(q, k, v)."""
    def f(q, k, v, cot):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(cot.astype(out.dtype))
    return jax.jit(f)(q, k, v, cot)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sequence", [2, 4])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_reference_forward_and_grad(strategy, sequence, kv_heads):
    mesh = make_mesh(data=2, sequence=sequence)
    q, k, v = qkv(G=kv_heads)
    cot = cotangent(q.shape)
    sq, sk, sv = place(mesh, P("data", "sequence", None, None), q, k, v)
    attn = lambda q, k, v: sequence_attention(q, k, v, mesh=mesh, strategy=strategy)

    out, grads = out_and_grads(attn, sq, sk, sv, cot)
    np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5, rtol=1e-5)
    want = reference_grads(q, k, v, cot)
    for name, g, w in zip("qkv", grads, want):
        assert g.shape == w.shape
        assert max_rel(g, w) <= 1e-5, (name, max_rel(g, w))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_eager_call_without_jit(strategy):
    mesh = make_mesh(sequence=4)
    q, k, v = qkv(G=2)
    out = sequence_attention(q, k, v, mesh=mesh, strategy=strategy)
    np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_composes_with_data_and_tensor(strategy, kv_heads):
    mesh = make_mesh(data=2, sequence=2, tensor=2)
    q, k, v = qkv(H=8, G=kv_heads, L=16)
    spec = P("data", "sequence", "tensor", None)
    sq, sk, sv = place(mesh, spec, q, k, v)

    def f(q, k, v):
        out = sequence_attention(q, k, v, mesh=mesh, strategy=strategy)
        return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, spec))

    cot = cotangent(q.shape)
    out, grads = out_and_grads(f, sq, sk, sv, cot)
    np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5, rtol=1e-5)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)
    want = reference_grads(q, k, v, cot)
    for g, w in zip(grads, want):
        assert max_rel(g, w) <= 1e-5


@pytest.mark.parametrize("strategy, collective", [("ulysses", "all-to-all"),
                                                  ("ring", "collective-permute")])
def test_hlo_has_the_collective(strategy, collective):
    mesh = make_mesh(data=2, sequence=4)
    q, k, v = place(mesh, P("data", "sequence", None, None), *qkv())
    hlo = jax.jit(lambda q, k, v: sequence_attention(q, k, v, mesh=mesh, strategy=strategy)
                  ).lower(q, k, v).compile().as_text()
    assert collective in hlo


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(strategy, dtype):
    mesh = make_mesh(data=2, sequence=4)
    q, k, v = qkv(G=2, dtype=dtype)
    sq, sk, sv = place(mesh, P("data", "sequence", None, None), q, k, v)
    out = jax.jit(lambda q, k, v: sequence_attention(q, k, v, mesh=mesh, strategy=strategy))(
        sq, sk, sv)
    assert out.dtype == dtype
    want = reference(*(t.astype(jnp.float32) for t in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


def test_ring_shrinks_attention_temp_memory():
    B, L, H, hd = 2, 256, 4, 8
    abstract = lambda mesh: tuple(
        jax.ShapeDtypeStruct((B, L, H, hd), jnp.float32,
                             sharding=NamedSharding(mesh, P("data", "sequence", None, None)))
        for _ in range(3))
    # Same rows per device (one), full length on one mesh, a quarter on the other.
    unsharded = make_mesh(data=2, sequence=1)
    sharded = make_mesh(data=2, sequence=4)
    plain = jax.jit(reference).lower(*abstract(unsharded)).compile()
    ring = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=sharded)
                   ).lower(*abstract(sharded)).compile()
    plain_temp = plain.memory_analysis().temp_size_in_bytes
    ring_temp = ring.memory_analysis().temp_size_in_bytes
    scores = L * L * H * 4                       # one row's fp32 [H, L, L] scores
    assert plain_temp >= scores
    assert ring_temp < plain_temp / 2, (ring_temp, plain_temp)


def test_errors():
    mesh = make_mesh(data=2, sequence=4)
    q, k, v = qkv(H=6, G=2)
    with pytest.raises(ValueError, match="6 query heads are not divisible by its size 4"):
        ulysses_attention(q, k, v, mesh=mesh)
    # Ring attention has no head constraint.
    np.testing.assert_allclose(ring_attention(q, k, v, mesh=mesh), reference(q, k, v),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        ring_attention(*qkv(L=30), mesh=mesh)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ring_attention(*qkv(H=4, G=3), mesh=mesh)
    with pytest.raises(ValueError, match="unknown sequence-parallel strategy"):
        sequence_attention(q, k, v, mesh=mesh, strategy="striped")
