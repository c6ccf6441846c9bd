"""Flat-bucket collectives (zerojax.buckets): the same function as XLA's per-array
collectives, one collective per bucket in the compiled step, and the rules that pick them."""
import contextlib
import dataclasses
import io
import re
from collections import Counter

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import zerojax
from zerojax import buckets, launch
from zerojax.config import ConfigError

from tests.helpers import PlainMLP, mlp_batches, relative_error, tiny_llama, token_batches


def _config(stage: int, collectives: str, **zero) -> dict:
    return {"train_batch_size": 16, "zero_optimization": {"stage": stage, **zero},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "gradient_clipping": 0.5, "zerojax": {"collectives": collectives, "mesh": {"data": 8}}}


def _train(model_fn, config: dict, batches) -> tuple[list[float], dict, zerojax.Engine]:
    engine = zerojax.initialize(model_fn=model_fn, config=config)
    losses = [float(engine.train_step(b)["loss"]) for b in batches]
    return losses, jax.device_get(engine.state.params), engine


def _collectives(engine, batch) -> Counter:
    """Buffers moved per collective kind in the compiled step (a tuple collective, e.g. two
    buffers XLA's combiner joined, counts each; an all-to-all counts one buffer per device)."""
    text = engine._compiled("train", batch).as_text()
    found = Counter()
    for m in re.finditer(r"\s(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(([^)]*)\)", text):
        found[m.group(1)] += m.group(2).count("%")
    return found


@pytest.mark.parametrize("stage,gas", [(3, 1), (1, 2)])
def test_bucketed_step_equals_xla_collectives(stage, gas):
    """ZeRO-3 (params gathered by bucket, gradients reduce-scattered by the gather's VJP) and
    ZeRO-1 with gradient accumulation: losses and params as with XLA's own collectives."""
    batches = token_batches(3, 16)
    config = lambda c: {**_config(stage, c), "gradient_accumulation_steps": gas}
    want_losses, want_params, _ = _train(tiny_llama, config("xla"), batches)
    losses, params, engine = _train(tiny_llama, config("bucketed"), batches)
    assert engine.bucket_plan is not None
    np.testing.assert_allclose(losses, want_losses, atol=2e-5, rtol=0)
    assert relative_error(params, want_params) <= 1e-5


def test_a_users_row_mean_loss_is_averaged_over_devices():
    """A user's module averaging its own rows (no compute.batch_mean): each device's loss is
    its rows' mean, and averaging losses and gradients over the devices is the global mean."""
    batches = mlp_batches(3, 16)
    want_losses, want_params, _ = _train(PlainMLP, _config(2, "xla"), batches)
    losses, params, _ = _train(PlainMLP, _config(2, "bucketed"), batches)
    np.testing.assert_allclose(losses, want_losses, atol=2e-5, rtol=0)
    assert relative_error(params, want_params) <= 1e-5


@pytest.mark.parametrize("stage", [3, 2])
def test_one_collective_per_bucket(stage):
    """Small bucket sizes split the tiny Llama into several buckets: the compiled step holds
    one buffer all-gathered per gather bucket (ZeRO-3) and per re-gather bucket (ZeRO-1/2:
    the params updated in shards), one all-to-all per gradient bucket kept split, one buffer
    all-reduced per gradient bucket kept whole, and two more (the loss's sum and count, the
    gradient norm). XLA's own collectives move the same params as more buffers."""
    batch = token_batches(1, 16)[0]
    sizes = {"stage3_prefetch_bucket_size": 20_000, "reduce_bucket_size": 300, "allgather_bucket_size": 300,
             "stage3_param_persistence_threshold": 1_000}
    engine = zerojax.initialize(model_fn=tiny_llama, config=_config(stage, "bucketed", **sizes))
    plan = engine.bucket_plan
    split_reduce = [b for b in plan.reduce_buckets if any(plan.grad_dims[i] is not None for i in b)]
    whole_reduce = [b for b in plan.reduce_buckets if any(plan.grad_dims[i] is None for i in b)]
    if stage == 3:
        # Params kept whole keep their gradients and optimizer state whole: nothing to re-gather.
        assert len(plan.gather_buckets) >= 2 and len(whole_reduce) >= 2 and not plan.regather_buckets
    else:
        assert not plan.gather_buckets and len(split_reduce) >= 2 and len(plan.regather_buckets) >= 2
    got = _collectives(engine, batch)
    devices = plan.devices
    assert got["all-gather"] == len(plan.gather_buckets) + len(plan.regather_buckets), got
    assert got["all-to-all"] == devices * (len(plan.gather_buckets) + len(split_reduce)), got
    assert got["all-reduce"] == 2 + len(whole_reduce), got
    assert got["reduce-scatter"] == 0, got
    xla = zerojax.initialize(model_fn=tiny_llama, config=_config(stage, "xla", **sizes))
    per_array = _collectives(xla, batch)
    buffers = lambda c: sum(c.values()) - c["all-to-all"] + c["all-to-all"] // devices
    assert buffers(per_array) > buffers(got), (per_array, got)


def test_bucket_sizes_group_consecutive_leaves():
    assert buckets._group([0, 1, 2, 3], [5, 5, 5, 20], 10) == ((0, 1), (2,), (3,))
    assert buckets._group([], [], 10) == ()


def test_flat_rows_round_trip():
    """A leaf split on any dim: device p's part of the whole array is row p, and back."""
    x = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4)
    for dim, devices in ((0, 2), (1, 3), (2, 4)):
        rows = buckets._to_rows(x, dim, devices)
        for p in range(devices):
            want = np.split(x, devices, axis=dim)[p]
            np.testing.assert_array_equal(rows[p], want.reshape(-1))
        shard_shape = np.split(x, devices, axis=dim)[0].shape
        np.testing.assert_array_equal(buckets._from_rows(rows, dim, shard_shape), x)


def test_auto_gathers_zero3_params_once_per_step_in_one_process():
    """One CPU process, "auto": XLA's collectives (no buckets), ZeRO-3's params gathered
    once before the module runs rather than per layer, remat "minimal", and the same
    function as the per-layer gathers ("xla")."""
    batches = token_batches(3, 16)
    want_losses, want_params, per_layer = _train(tiny_llama, _config(3, "xla"), batches)
    losses, params, engine = _train(tiny_llama, _config(3, "auto"), batches)
    assert engine.bucket_plan is None          # one process: XLA:CPU collectives are memory copies
    assert engine.gathers_whole_step and not per_layer.gathers_whole_step
    assert engine.policy.remat == "minimal" and per_layer.policy.remat == "full"
    assert engine.step_spec.gathered_specs is not None and not engine.policy.gather_params
    np.testing.assert_allclose(losses, want_losses, atol=2e-5, rtol=0)
    assert relative_error(params, want_params) <= 1e-5
    # Params that would not fit stage3_max_live_parameters at once are gathered per layer.
    small = _config(3, "auto", stage3_max_live_parameters=1000, stage3_param_persistence_threshold=0)
    assert not zerojax.initialize(model_fn=tiny_llama, config=small).gathers_whole_step


@pytest.mark.parametrize("change,expected", [
    ({"zerojax": {"collectives": "bucketed", "mesh": {"data": 4, "tensor": 2}}}, "only the data axis"),
    ({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1000,
                            "stage3_param_persistence_threshold": 0}}, "stage3_max_live_parameters"),
])
def test_bucketed_where_it_cannot_run_is_a_config_error(change, expected):
    config = _config(3, "bucketed")
    for key, value in change.items():
        config[key] = {**config[key], **value}
    with pytest.raises(ConfigError, match=expected):
        zerojax.initialize(model_fn=tiny_llama, config=config)


def test_bucket_sizes_parse_as_deepspeed_writes_them():
    config = zerojax.Config.load({"train_batch_size": 8, "zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 5e6}})
    assert config.zero_optimization.reduce_bucket_size == 500_000_000      # HF's "auto": the default
    assert config.zero_optimization.stage3_prefetch_bucket_size == 5_000_000
    with pytest.raises(ConfigError, match="allgather_bucket_size"):
        zerojax.Config.load({"train_batch_size": 8, "zero_optimization": {"allgather_bucket_size": 0}})


def test_launch_binds_each_cpu_process_to_its_own_cores():
    allowed = sorted(__import__("os").sched_getaffinity(0))
    sets = launch.core_sets(len(allowed), "on", {})
    assert sorted(c for s in sets for c in s) == allowed and all(len(s) == 1 for s in sets)
    assert launch.core_sets(2, "off", {}) == [None, None]
    assert launch.core_sets(2, "auto", {"JAX_PLATFORMS": "cuda"}) == [None, None]
    assert launch.core_sets(len(allowed) + 1, "on", {}) == [None] * (len(allowed) + 1)


def test_whole_model_remat_keeps_only_dot_outputs_of_a_users_module():
    """The CPU remat policy over a user's module (no zerojax calls): the backward pass keeps
    the matmul outputs and recomputes the element-wise work (GELU) from them."""
    engine = zerojax.initialize(model_fn=PlainMLP, config={
        "train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zerojax": {"remat": "minimal", "mesh": {"data": 1}}})
    spec = engine.step_spec
    assert spec.whole_model_remat is not None
    batch = mlp_batches(1, 8)[0]
    from zerojax.step import model_loss

    def computed_residuals(spec) -> list[str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(
                lambda p: model_loss(spec, p, engine.state.model_state, batch)[0],
                jax.device_get(engine.state.params))
        return [line for line in out.getvalue().splitlines()
                if "from the argument" not in line and "from a constant" not in line]

    kept = computed_residuals(spec)
    assert kept and all("output of dot_general" in line for line in kept), kept
    plain = computed_residuals(dataclasses.replace(spec, whole_model_remat=None))
    assert any("output of dot_general" not in line for line in plain), plain    # GELU's work
