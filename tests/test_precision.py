"""DeepSpeed's dynamic loss scaler, and fp16 overflow handling in the engine."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zerojax
from zerojax import precision
from tests.helpers import PlainMLP, mlp_batches, tiny_llama, token_batches


def scales_for(overflows, **fp16):
    """The scale each step runs with (before its update), and the scale after the last."""
    config = zerojax.Config.load({"train_batch_size": 8, "fp16": {"enabled": True, **fp16}})
    state = precision.init_loss_scale(config)
    used = []
    for overflow in overflows:
        used.append(float(state.scale))
        state = precision.update_loss_scale(state, jnp.asarray(overflow), config)
    return used, float(state.scale)


PATTERN = [False, False, False, True, True, False, True, False, False, False, True]


def test_scale_sequence_with_hysteresis_and_window():
    # Hand-computed from DeepSpeed's rules: start 16, window 3, hysteresis 2.
    used, final = scales_for(PATTERN, initial_scale_power=4, loss_scale_window=3, hysteresis=2)
    assert used == [16, 16, 16, 32, 32, 16, 16, 8, 8, 8, 16]
    assert final == 16


def test_scale_sequence_with_consecutive_hysteresis():
    used, final = scales_for(PATTERN, initial_scale_power=4, loss_scale_window=3, hysteresis=2,
                             consecutive_hysteresis=True)
    assert used == [16, 16, 16, 32, 32, 16, 16, 16, 16, 16, 32]
    assert final == 32


def test_scale_never_below_minimum():
    used, final = scales_for([True] * 6, initial_scale_power=4, hysteresis=1, min_loss_scale=4)
    assert used == [16, 8, 4, 4, 4, 4] and final == 4


def test_static_loss_scale_never_moves():
    used, final = scales_for([True, False, False], loss_scale=128)
    assert used == [128, 128, 128] and final == 128


def test_default_scale_is_2_to_the_16():
    used, _ = scales_for([False])
    assert used == [65536.0]


@pytest.mark.parametrize("stage", [0, 3])
def test_overflow_skips_the_update(stage):
    config = {"train_batch_size": 8,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                           "warmup_num_steps": 10, "warmup_type": "linear"}},
              "fp16": {"enabled": True, "initial_scale_power": 8, "hysteresis": 1},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine = zerojax.initialize(model_fn=PlainMLP, config=config)
    batches = mlp_batches(4, 8)
    for b in batches:
        b["scale"] = np.ones(8, np.float32)
    first = engine.train_step(batches[0])
    second = engine.train_step(batches[1])
    assert not bool(second["skipped"])
    before = jax.tree.map(np.asarray, (engine.state.params, engine.state.opt_state))

    batches[2]["scale"][3] = np.inf
    boom = engine.train_step(batches[2])
    assert bool(boom["skipped"])
    assert float(boom["loss_scale"]) == 256.0
    after = jax.tree.map(np.asarray, (engine.state.params, engine.state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)   # untouched, bitwise
    assert int(boom["step"]) == 2

    resumed = engine.train_step(batches[3])
    assert float(resumed["loss_scale"]) == 128.0               # halved after the overflow
    assert not bool(resumed["skipped"]) and int(resumed["step"]) == 3
    # The scheduler did not advance on the skipped step: lr goes 0, 0, (1e-3 skipped), 1e-3.
    np.testing.assert_allclose([float(first["lr"]), float(second["lr"]), float(resumed["lr"])],
                               [0.0, 0.0, 1e-3], atol=1e-9)


def test_seed_config_trains_as_is():
    seed = {"train_batch_size": 16, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-5}},
            "fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    engine = zerojax.initialize(model_fn=tiny_llama, config=seed)
    assert engine.batch_sizes.micro_batch_size == 2
    metrics = [engine.train_step(b) for b in token_batches(3, 16)]
    assert float(metrics[0]["loss_scale"]) == 2.0 ** 16
    assert all(np.isfinite(float(m["loss"])) for m in metrics)
    assert int(metrics[-1]["step"]) >= 1


class EmbedMLP(nnx.Module):
    """A user's module starting with nnx.Embed, whose `dtype` defaults to float32."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(64, 32, rngs=rngs)
        self.hidden = nnx.Linear(32, 64, rngs=rngs)
        self.out = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, batch):
        logits = self.embed.attend(self.out(jax.nn.gelu(self.hidden(self.embed(batch["input_ids"])))))
        return -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])


def test_bf16_runs_a_users_module_in_bf16():
    """DeepSpeed's bf16 runs a module in bf16; a Flax module's nnx.Embed (dtype float32 by
    default) made everything after it fp32. Under bf16 every matmul of the step now takes
    bf16 operands, and it trains."""
    from zerojax.step import model_loss
    engine = zerojax.initialize(model_fn=EmbedMLP, config={
        "train_batch_size": 8, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "zerojax": {"mesh": {"data": 1}}})
    batch = token_batches(1, 8)[0]
    jaxpr = jax.make_jaxpr(lambda p: model_loss(engine.step_spec, p, engine.state.model_state, batch)[0])(
        engine.state.params)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive is jax.lax.dot_general_p]
    assert len(dots) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), dots
    losses = [float(engine.train_step(batch)["loss"]) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert isinstance(engine.state.params["embed"]["embedding"], jax.Array)
    assert engine.state.params["embed"]["embedding"].dtype == jnp.float32      # fp32 masters
