"""zerojax.dot_forms: weight-gradient dots rewritten into the operand form XLA:CPU's GEMM
fusions take; the same function, and no dot left to Eigen in a user module's step."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zerojax
from zerojax import dot_forms
from zerojax.step import train_step

from tests.helpers import relative_error


class UserMLPStack(nnx.Module):
    """A user's module: nnx.Linear layers in a Python loop, row-mean loss, nothing of zerojax."""

    def __init__(self, rngs: nnx.Rngs, width: int = 128, layers: int = 2):
        self.embed = nnx.Embed(64, width, rngs=rngs)
        self.ups = nnx.List([nnx.Linear(width, 2 * width, rngs=rngs) for _ in range(layers)])
        self.downs = nnx.List([nnx.Linear(2 * width, width, rngs=rngs) for _ in range(layers)])

    def __call__(self, batch):
        ids = batch["input_ids"]
        x = self.embed(ids)
        for up, down in zip(self.ups, self.downs):
            x = x + down(jax.nn.gelu(up(x)))
        logits = self.embed.attend(x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))


def _dots(jaxpr) -> list:
    """Every dot_general equation, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is jax.lax.dot_general_p:
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_dots(sub))
    return found


def _lhs_in_gemm_form(eqn) -> bool:
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    ndim = eqn.invars[0].aval.ndim
    free = [d for d in range(ndim) if d not in lc and d not in lb]
    return tuple(lb) + tuple(free) + tuple(lc) == tuple(range(ndim))


def _loss(params, x):
    """Two dense layers inside a layer scan under remat, as the reference models run them."""
    def layer(h, w):
        return jax.checkpoint(lambda h, w: jax.nn.gelu(h @ w[0]) @ w[1])(h, w), None
    h, _ = jax.lax.scan(layer, x, params)
    return jnp.mean(h ** 2)


def test_weight_gradients_take_the_gemm_form_and_the_same_values():
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.normal(size=(3, 2, 64, 64)) * 0.1, jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 96, 64)), jnp.float32)
    grad_fn = jax.value_and_grad(_loss)
    before = _dots(jax.make_jaxpr(grad_fn)(params, x).jaxpr)
    assert any(not _lhs_in_gemm_form(e) for e in before)      # autodiff's dW = x^T g
    rewritten = dot_forms.in_gemm_form(grad_fn)
    after = _dots(jax.make_jaxpr(rewritten)(params, x).jaxpr)
    assert len(after) == len(before) and all(_lhs_in_gemm_form(e) for e in after)
    (want_loss, want), (loss, got) = jax.jit(grad_fn)(params, x), jax.jit(rewritten)(params, x)
    # DESIGN.md's bound for the same math summed in another order (two compiled programs).
    assert abs(float(loss) - float(want_loss)) <= 2e-5
    assert relative_error(got, want) <= 1e-5


def _transposed_shapes(jaxpr) -> list[tuple[int, ...]]:
    return [tuple(e.invars[0].aval.shape) for e in jaxpr.eqns if e.primitive is jax.lax.transpose_p]


def test_a_wide_left_operand_swaps_sides_instead_of_being_copied():
    """dW = gelu(h)^T g of a down-projection: the wide activation stays where it is (XLA would
    fuse its recomputation into a slow transposed loop); the narrow g and dW are moved."""
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(4, 128, 512)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(4, 128, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(512, 64)) * 0.05, jnp.float32)

    def loss(w, h, g):
        return jnp.sum(jnp.tanh(jax.nn.gelu(h) @ w) * g)

    grad_fn = jax.grad(loss)
    rewritten = dot_forms.in_gemm_form(grad_fn)
    jaxpr = jax.make_jaxpr(rewritten)(w, h, g).jaxpr
    assert all(_lhs_in_gemm_form(e) for e in _dots(jaxpr))
    assert sorted(_transposed_shapes(jaxpr)) == [(4, 128, 64), (64, 512)]     # g, and dW^T back
    # An up-projection's dW = x^T g, x the narrow side: x is the one copied.
    x = jnp.asarray(rng.normal(size=(4, 128, 64)), jnp.float32)
    up = jax.make_jaxpr(dot_forms.in_gemm_form(jax.grad(loss)))(w.T, x, h).jaxpr
    assert all(_lhs_in_gemm_form(e) for e in _dots(up))
    assert _transposed_shapes(up) == [(4, 128, 64)]
    assert relative_error(jax.jit(rewritten)(w, h, g), jax.jit(grad_fn)(w, h, g)) <= 1e-5


def _eigen_dots(hlo: str) -> int:
    """Dots XLA:CPU runs outside a fusion (Eigen); those inside a fusion are XNNPACK's."""
    count = 0
    for computation in re.split(r"\n(?=\S)", hlo):
        if not computation.startswith("%fused_computation"):
            count += len(re.findall(r"= \S+ dot\(", computation))
    return count


def test_users_bucketed_step_runs_every_dot_in_a_gemm_fusion():
    """A user's module over flat buckets (each device's rows inside a shard_map), where XLA
    otherwise folds the weight gradients into Eigen dots: rewritten, none are left."""
    config = {"train_batch_size": 16, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zerojax": {"collectives": "bucketed", "mesh": {"data": 8}}}
    batch = {"input_ids": np.random.default_rng(0).integers(0, 64, size=(16, 64)).astype(np.int32)}
    engine = zerojax.initialize(model_fn=UserMLPStack, config=config)
    assert engine.step_spec.gemm_form_dots                    # bucketed on CPU
    rewritten = engine._compiled("train", batch).as_text()
    plain_spec = dataclasses.replace(engine.step_spec, gemm_form_dots=False)
    plain = jax.jit(functools.partial(train_step, plain_spec)).lower(
        engine.state, engine._abstract_batch(batch)).compile().as_text()
    assert _eigen_dots(plain) > 0
    assert _eigen_dots(rewritten) == 0


class Bf16UserMLP(nnx.Module):
    """A user's mixed-precision module as Flax users write one: layers with dtype=bfloat16."""

    def __init__(self, rngs: nnx.Rngs, width: int = 128):
        self.up = nnx.Linear(16, width, dtype=jnp.bfloat16, rngs=rngs)
        self.down = nnx.Linear(width, 4, dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, batch):
        pred = self.down(jax.nn.gelu(self.up(batch["x"]))).astype(jnp.float32)
        return jnp.mean((pred - batch["y"]) ** 2)


def test_bf16_dots_accumulate_in_f32_and_train_the_same_function():
    """bf16 on CPU: every bf16 x bf16 dot of the step yields fp32 (then rounds), none a bf16
    result, and the losses stay within DESIGN.md's bf16 bound."""
    config = {"train_batch_size": 16, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zerojax": {"mesh": {"data": 1}}}
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(16, 16)).astype(np.float32), "y": rng.normal(size=(16, 4)).astype(np.float32)}
               for _ in range(3)]
    engine = zerojax.initialize(model_fn=Bf16UserMLP, config=config)
    spec = engine.step_spec
    assert spec.bf16_dots_in_f32 and spec.gemm_form_dots        # every CPU step, not only bucketed

    def bf16_dots(spec) -> list:
        step = functools.partial(train_step, spec)
        dots = _dots(jax.make_jaxpr(step)(engine.state, batches[0]).jaxpr)
        return [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]

    plain_spec = dataclasses.replace(spec, bf16_dots_in_f32=False)
    assert any(e.outvars[0].aval.dtype == jnp.bfloat16 for e in bf16_dots(plain_spec))
    rewritten = bf16_dots(spec)
    assert rewritten and all(e.outvars[0].aval.dtype == jnp.float32 for e in rewritten)

    def losses(spec):
        step = jax.jit(functools.partial(train_step, spec))
        state, out = jax.tree.map(jnp.copy, engine.state), []
        for batch in batches:
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
        return out

    np.testing.assert_allclose(losses(spec), losses(plain_spec), atol=1e-3, rtol=0)
