"""Pallas RMSNorm / LayerNorm (interpret mode on CPU) against plain-jnp references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zerojax.kernels import _backend
from zerojax.kernels.norms import layer_norm, rms_norm

EPS = 1e-5


def ref_rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * (x32 * rstd).astype(x.dtype)


def ref_layer_norm(x, weight, bias, eps):
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    out = centred * rstd * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _inputs(shape, dtype, seed, bias=False):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    d = shape[-1]
    x = (jax.random.normal(keys[0], shape) * 2 + 0.5).astype(dtype)
    w = (1 + 0.3 * jax.random.normal(keys[1], (d,))).astype(dtype)
    b = (0.2 * jax.random.normal(keys[2], (d,))).astype(dtype)
    dy = jax.random.normal(keys[3], shape).astype(dtype)
    return (x, w, b, dy) if bias else (x, w, dy)


def _check(fused, ref, args, dy, tol):
    out, vjp = jax.vjp(fused, *args)
    out_ref, vjp_ref = jax.vjp(ref, *args)
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
    assert rel_err(out, out_ref) <= tol, ("forward", rel_err(out, out_ref))
    for i, (g, g_ref) in enumerate(zip(vjp(dy.astype(out.dtype)), vjp_ref(dy.astype(out.dtype)))):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape
        assert rel_err(g, g_ref) <= tol, (f"grad {i}", rel_err(g, g_ref))


# rows 2*13 = 26 and 37 are not multiples of the block; D = 48 is not a power of two
@pytest.mark.parametrize("shape,dtype", [((2, 13, 32), jnp.float32), ((37, 48), jnp.float32),
                                         ((2, 13, 48), jnp.bfloat16)])
def test_rms_norm_matches_reference(shape, dtype):
    x, w, dy = _inputs(shape, dtype, seed=0)
    fused = jax.jit(lambda x, w: rms_norm(x, w, eps=EPS, interpret=True, block_rows=8))
    _check(fused, lambda x, w: ref_rms_norm(x, w, EPS), (x, w), dy, TOL[dtype])


def test_rms_norm_promotes_like_reference():
    """bf16 activations with an fp32 weight give fp32 output, as `scale * normed` does."""
    x, w, dy = _inputs((2, 5, 32), jnp.bfloat16, seed=1)
    w = w.astype(jnp.float32)
    fused = jax.jit(lambda x, w: rms_norm(x, w, eps=EPS, interpret=True, block_rows=4))
    _check(fused, lambda x, w: ref_rms_norm(x, w, EPS), (x, w), dy.astype(jnp.float32), 2e-2)


@pytest.mark.parametrize("shape,dtype", [((2, 13, 32), jnp.float32), ((37, 48), jnp.float32),
                                         ((2, 13, 48), jnp.bfloat16)])
def test_layer_norm_matches_reference(shape, dtype):
    x, w, b, dy = _inputs(shape, dtype, seed=2, bias=True)
    fused = jax.jit(lambda x, w, b: layer_norm(x, w, b, eps=EPS, interpret=True, block_rows=8))
    _check(fused, lambda x, w, b: ref_layer_norm(x, w, b, EPS), (x, w, b), dy, TOL[dtype])


def test_norms_lower_for_cuda():
    """Forward and gradient lower through Pallas's Triton backend without a GPU."""
    x = jnp.ones((64, 96), jnp.bfloat16)
    w = jnp.ones((96,), jnp.bfloat16)
    b = jnp.zeros((96,), jnp.bfloat16)

    def rms_loss(x, w):
        return jnp.sum(rms_norm(x, w, eps=EPS, interpret=False).astype(jnp.float32))

    def ln_loss(x, w, b):
        return jnp.sum(layer_norm(x, w, b, eps=EPS, interpret=False).astype(jnp.float32))

    for f, args in ((rms_loss, (x, w)), (ln_loss, (x, w, b))):
        for g in (f, jax.grad(f, argnums=tuple(range(len(args))))):
            lowered = jax.jit(g).trace(*args).lower(lowering_platforms=("cuda",))
            assert "triton" in lowered.as_text().lower()
    assert _backend.resolve_interpret(None) is True      # CPU default: interpret mode
