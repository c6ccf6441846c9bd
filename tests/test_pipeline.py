"""Pipeline parallelism (GPipe, 1F1B) computes the non-pipelined function, with ZeRO over data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zerojax
from zerojax.config import ConfigError
from zerojax.models import Llama, LlamaConfig
from tests.helpers import relative_error, token_batches

PIPE_LLAMA = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
ROWS, STEPS = 32, 3


def pipe_llama(rngs):
    return Llama(PIPE_LLAMA, rngs=rngs)


def config(stages=1, micro=1, schedule="1f1b", stage=0, **extra):
    return {"train_batch_size": ROWS, "gradient_accumulation_steps": micro,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "pipeline": {"stages": stages, "schedule": schedule}, **extra}


def losses(engine, batches):
    return np.array([float(engine.train_step(b)["loss"]) for b in batches])


@pytest.fixture(scope="module")
def batches():
    return token_batches(STEPS, ROWS)


_reference: dict[int, np.ndarray] = {}


def reference(micro, batches):
    """The same model, config and micro-batches without a pipeline (data 2: rows divide)."""
    if micro not in _reference:
        engine = zerojax.initialize(model_fn=pipe_llama, config=config(1, micro, zerojax={"mesh": {"data": 2}}))
        _reference[micro] = losses(engine, batches)
    return _reference[micro]


# Pairwise cover of stages {2, 4} × schedule × micro-batches {P, 2P} × ZeRO {0, 3} (every
# pair of values of any two factors appears), plus 4P micro-batches under ZeRO-1; ZeRO-1
# with 4 stages is also in the gradient test below.
CASES = [(2, "1f1b", 2, 0), (2, "gpipe", 4, 3), (4, "1f1b", 8, 3), (4, "gpipe", 4, 3), (4, "gpipe", 8, 0),
         (2, "1f1b", 8, 1)]


@pytest.mark.parametrize("stages, schedule, micro, stage", CASES)
def test_pipeline_matches_the_unpipelined_run(stages, schedule, micro, stage, batches):
    engine = zerojax.initialize(model_fn=pipe_llama, config=config(stages, micro, schedule, stage))
    assert engine.mesh.shape["pipe"] == stages and engine.mesh.shape["data"] == 8 // stages
    np.testing.assert_allclose(losses(engine, batches), reference(micro, batches), atol=1e-4, rtol=0)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_pipeline_gradients_equal_unpipelined_gradients(schedule, batches):
    """With SGD at lr 1 and no clipping, params_before - params_after is exactly the gradient."""
    sgd = {"optimizer": {"type": "SGD", "params": {"lr": 1.0}}, "gradient_clipping": 0}

    def gradient(cfg):
        engine = zerojax.initialize(model_fn=pipe_llama, config={**cfg, **sgd})
        before = jax.tree.map(np.asarray, engine.state.params)
        engine.train_step(batches[0])
        return jax.tree.map(lambda b, a: b - np.asarray(a, np.float64), before, engine.state.params)

    plain = gradient(config(1, 4, zerojax={"mesh": {"data": 2}}))
    piped = gradient(config(4, 4, schedule, stage=1))
    assert relative_error(piped, plain) <= 1e-4
    for name in ("embed_tokens", "lm_head", "norm"):          # first- and last-stage params too
        assert relative_error(piped[name], plain[name]) <= 1e-4, name


@pytest.mark.slow
def test_1f1b_memory_grows_with_stages_not_micro_batches():
    long = LlamaConfig(**{**PIPE_LLAMA.__dict__, "max_position_embeddings": 128})

    def temp(schedule, stages, micro):
        engine = zerojax.initialize(
            model_fn=lambda r: Llama(long, rngs=r), abstract=True,
            config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": micro,
                    "optimizer": {"type": "AdamW"}, "pipeline": {"stages": stages, "schedule": schedule},
                    "zerojax": {"mesh": {"data": 1}}},
            example_batch={"input_ids": np.zeros((1, 128), np.int32)})
        return engine.memory_report()["temp"]

    # 3x the micro-batches: GPipe keeps them all (measured 1.66x the temp bytes), 1F1B at
    # most 2P-1 per stage (1.00x).
    one_f_one_b = temp("1f1b", 2, 6) / temp("1f1b", 2, 2)
    gpipe = temp("gpipe", 2, 6) / temp("gpipe", 2, 2)
    assert one_f_one_b <= 1.15, one_f_one_b
    assert gpipe >= 1.5, gpipe


@pytest.mark.parametrize("overrides, message", [
    ({"pipeline": {"stages": 8}}, r"'layers' dimension is 4, which pipe size 8 does not divide"),
    ({"pipeline": {"stages": 2, "schedule": "1f1b"}, "gradient_accumulation_steps": 1},
     r"at least 2 micro-batches.*got 1"),
    ({"pipeline": {"stages": 2, "schedule": "interleaved"}}, "interleaved"),
    ({"pipeline": {"stages": 2, "partition": "type:Block"}}, "partition"),
])
def test_impossible_pipelines_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        zerojax.initialize(model_fn=pipe_llama, config={**config(1, 2), **overrides})


def test_a_model_without_stages_is_a_config_error():
    from tests.helpers import PlainMLP
    with pytest.raises(ConfigError, match="run_layers"):
        zerojax.initialize(model_fn=PlainMLP, config={"train_batch_size": 8, "gradient_accumulation_steps": 2,
                                                      "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                                                      "pipeline": {"stages": 2}})


class StackedMLP(nnx.Module):
    """A user's own pipelined model: three methods and one param stack with a 'layers' axis."""

    def __init__(self, rngs: nnx.Rngs, layers: int = 4, width: int = 16):
        init = jax.nn.initializers.normal(0.3)
        self.inp = nnx.Param(init(rngs.params(), (8, width)))
        self.stack = nnx.Param(init(rngs.params(), (layers, width, width)),
                               out_sharding=("layers", None, None), eager_sharding=False)
        self.out = nnx.Param(init(rngs.params(), (width, 1)))

    def embed(self, x):
        return jnp.tanh(x @ self.inp[...])

    def run_layers(self, h):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, self.stack[...])[0]

    def head_loss(self, h, batch):
        return jnp.mean((h @ self.out[...] - batch["y"]) ** 2)

    def __call__(self, batch):
        return self.head_loss(self.run_layers(self.embed(batch["input_ids"])), batch)


def test_a_user_module_is_pipelined_through_the_same_three_methods():
    rng = np.random.default_rng(0)
    data = [{"input_ids": rng.normal(size=(16, 8)).astype(np.float32),
             "y": rng.normal(size=(16, 1)).astype(np.float32)} for _ in range(3)]
    cfg = {"train_batch_size": 16, "gradient_accumulation_steps": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}}}
    plain = losses(zerojax.initialize(model_fn=StackedMLP, config={**cfg, "zerojax": {"mesh": {"data": 2}}}), data)
    piped = losses(zerojax.initialize(model_fn=StackedMLP, config={**cfg, "pipeline": {"stages": 4}}), data)
    np.testing.assert_allclose(piped, plain, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_checkpoint_saved_under_a_pipeline_loads_plain_and_back(tmp_path, batches):
    piped = zerojax.initialize(model_fn=pipe_llama, config=config(2, 4, stage=3))
    piped.train_step(batches[0])
    piped.save_checkpoint(str(tmp_path / "piped"))
    plain = zerojax.initialize(model_fn=pipe_llama, config=config(1, 4, zerojax={"mesh": {"data": 2}}))
    plain.load_checkpoint(str(tmp_path / "piped"))
    # A restore returns the saved bytes, whatever the layout: an identity, bitwise.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, plain.state.params),
                 jax.tree.map(np.asarray, piped.state.params))
    plain.save_checkpoint(str(tmp_path / "plain"))
    back = zerojax.initialize(model_fn=pipe_llama, config=config(4, 4, "gpipe"))
    back.load_checkpoint(str(tmp_path / "plain"))
    a, b = float(back.train_step(batches[1])["loss"]), float(piped.train_step(batches[1])["loss"])
    assert abs(a - b) <= 1e-4
