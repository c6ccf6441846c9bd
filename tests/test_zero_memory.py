"""Per-device bytes of each ZeRO stage, from the arrays' shards and the compiler."""
from __future__ import annotations

import jax
import pytest

import zerojax
from tests.helpers import compile_events, tiny_llama, token_batches


# "xla": ZeRO-3 gathers per layer, as on accelerators ("auto" in one CPU process gathers
# once for the whole step: test_buckets).
PER_LAYER = {"collectives": "xla"}


def engine_for(stage: int, gas: int = 1):
    config = {"train_batch_size": 16, "gradient_accumulation_steps": gas,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "zerojax": PER_LAYER}
    return zerojax.initialize(model_fn=tiny_llama, config=config,
                              example_batch=token_batches(1, 16)[0])


@pytest.fixture(scope="module")
def reports():
    return {stage: engine_for(stage).memory_report() for stage in (0, 1, 2, 3)}


def test_stage0_holds_everything(reports):
    n_params = sum(p.size for p in jax.tree.leaves(engine_for(0).state.params))
    assert reports[0]["params"] == 4 * n_params
    # Adam: two moments per param plus a few scalars (step count, injected hyperparams).
    assert 8 * n_params <= reports[0]["optimizer"] <= 8 * n_params + 64


def test_stage1_shards_optimizer_state(reports):
    assert reports[1]["params"] == reports[0]["params"]
    assert reports[1]["optimizer"] <= reports[0]["optimizer"] / 8 + 64


def test_stage2_shards_gradients_and_cuts_temp(reports):
    assert reports[2]["grads"] == reports[0]["grads"] // 8
    assert reports[2]["temp"] < reports[1]["temp"]


def test_stage3_model_state_is_an_eighth(reports):
    state = lambda r: r["params"] + r["optimizer"]
    assert state(reports[3]) <= state(reports[0]) / 7.5
    assert reports[3]["params"] == reports[0]["params"] // 8


def test_stage3_gathers_params_inside_the_layer_scan():
    hlo = engine_for(3).lower_train_step(token_batches(1, 16)[0]).compile().as_text()
    assert "all-gather" in hlo


def test_stage3_remat_does_not_keep_gathered_params():
    def temp(remat):
        config = {"train_batch_size": 16, "optimizer": {"type": "AdamW"},
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zerojax": {"remat": remat, **PER_LAYER}}
        engine = zerojax.initialize(model_fn=tiny_llama, config=config, abstract=True,
                                    example_batch=token_batches(1, 16)[0])
        return engine.memory_report()["temp"]

    assert temp("full") < temp("none")


def test_stage3_minimal_remat_keeps_no_param_shaped_residual():
    """ZeRO-3 under remat "minimal" keeps matmul outputs, and a gathered param is none: the
    backward pass gathers it again rather than keeping it (no residual has a stacked param's
    shape)."""
    import contextlib
    import io
    from zerojax.step import model_loss
    config = {"train_batch_size": 16, "optimizer": {"type": "AdamW"},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zerojax": {"remat": "minimal", **PER_LAYER}}
    engine = zerojax.initialize(model_fn=tiny_llama, config=config)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: model_loss(engine.step_spec, p, engine.state.model_state, token_batches(1, 16)[0])[0],
            engine.state.params)
    computed = [line.split(" ", 1)[0] for line in out.getvalue().splitlines() if "from the argument" not in line]
    param_shapes = {f"{x.dtype}[{','.join(map(str, x.shape))}]".replace("float32", "f32")
                    for x in jax.tree.leaves(engine.state.params["layers"])}
    assert computed and not param_shapes & set(computed), (param_shapes, computed)


def test_auto_remat_rule():
    from zerojax.config import ActivationCheckpointingConfig, RematPolicy
    from zerojax.engine import resolve_remat
    section = ActivationCheckpointingConfig()
    assert resolve_remat("auto", 3, None, "gpu") == "full"            # never keep gathered params
    assert resolve_remat("auto", 1, section, "gpu") == "full"         # DeepSpeed's section asks for it
    assert resolve_remat("auto", 1, None, "gpu") == "none"
    assert resolve_remat("auto", 0, None, "cpu") == "minimal"         # recompute beats memory traffic
    assert resolve_remat("auto", 3, None, "cpu", gathers_per_layer=False) == "minimal"  # bucketed
    assert resolve_remat("auto", 3, None, "gpu", gathers_per_layer=False) == "none"
    assert resolve_remat("none", 3, section, "cpu") == "none"         # an explicit choice wins
    # DeepSpeed's cpu_checkpointing keeps each layer's input in host memory.
    cpu = ActivationCheckpointingConfig(cpu_checkpointing=True)
    assert resolve_remat("auto", 1, cpu, "gpu") == RematPolicy("full", offload=("layer_input",))
    assert resolve_remat("minimal", 1, cpu, "gpu") == RematPolicy("minimal", offload=("layer_input",))
    saved = RematPolicy("full", save=("layer_input",))
    assert resolve_remat(saved, 1, cpu, "gpu") == saved               # the policy's own choice wins


def test_train_step_and_memory_report_share_one_compile():
    engine = engine_for(1)
    batch = token_batches(1, 16)[0]
    with compile_events() as events:
        engine.train_step(batch)
        first = len(events)
        engine.memory_report()
        engine.train_step(batch)
    assert first >= 1                      # the listener sees the step's executable made
    assert len(events) == first            # ... and nothing compiles again


CACHED_STEP_PROGRAM = """
import sys, jax, zerojax
from tests.helpers import tiny_llama, token_batches
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
engine = zerojax.initialize(model_fn=tiny_llama, config={
    "train_batch_size": 8, "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 3},
    "zerojax": {"compilation_cache": sys.argv[1]}})
engine.train_step(token_batches(1, 8)[0])
print("cache hits", events.count("/jax/compilation_cache/cache_hits"))
"""


@pytest.mark.slow
def test_initialize_uses_the_persistent_compilation_cache(tmp_path):
    """`compilation_cache` in an initialize() config: a second process loads the step's
    executable instead of compiling it."""
    import os
    import subprocess
    import sys

    def hits():
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # not the suite's
        proc = subprocess.run([sys.executable, "-c", CACHED_STEP_PROGRAM, str(tmp_path / "cache")],
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return int(proc.stdout.split("cache hits")[-1])

    assert hits() == 0
    assert any((tmp_path / "cache").iterdir())
    assert hits() >= 1


def test_zero3_in_bf16_casts_the_stored_shards_before_gathering():
    """Under ZeRO-3 with a 16-bit compute dtype the step casts each param shard where it is
    stored, so the per-layer gathers move 16-bit values (as DeepSpeed's do): the step's first
    layout constraint on each param is a bf16 one in the stored (sharded) layout. (XLA:CPU
    still runs the gathers in f32: it has no bf16 collectives.)"""
    import dataclasses
    import functools

    import jax.numpy as jnp

    from zerojax.step import model_loss
    cfg = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine = zerojax.initialize(model_fn=tiny_llama, config=cfg, abstract=True)
    batch = {"input_ids": jax.ShapeDtypeStruct((8, 16), jnp.int32)}
    jaxpr = jax.make_jaxpr(functools.partial(model_loss, engine.step_spec))(
        engine.state.params, engine.state.model_state, batch)
    leaves = len(jax.tree.leaves(engine.state.params))
    first = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "sharding_constraint"][:leaves]
    assert first and all(eqn.invars[0].aval.dtype == jnp.bfloat16 for eqn in first)
    assert all("data" in str(eqn.params["sharding"].spec) for eqn in first)
    plain = dataclasses.replace(engine.step_spec, cast_shards_first=None)
    jaxpr = jax.make_jaxpr(functools.partial(model_loss, plain))(
        engine.state.params, engine.state.model_state, batch)
    first = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "sharding_constraint"][:leaves]
    assert not all(eqn.invars[0].aval.dtype == jnp.bfloat16 for eqn in first)
