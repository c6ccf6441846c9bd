"""ZeRO-Offload of the optimizer state to host memory (JAX memory kinds).

On CPU the host and device memories are the same RAM, so these tests check placement
(`memory_kind`), the transfers in the compiled step, and numerics; savings show on a GPU.
"""
from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import zerojax
from tests.helpers import relative_error, tiny_llama, token_batches
from zerojax.config import Config, ConfigError, UnsupportedKeyWarning

ROWS = 16
STEPS = 3


def config(stage: int, offload: bool, **section) -> dict:
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True, "ratio": 1.0, **section}
    return {"train_batch_size": ROWS,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
            "gradient_clipping": 1.0, "zero_optimization": zero}


def memory_kinds(tree) -> set[str]:
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def batches():
    return token_batches(STEPS, ROWS)


@pytest.fixture(scope="module", params=[1, 3])
def runs(request, batches):
    """(stage, plain engine, offloaded engine, plain losses, offloaded losses) after STEPS steps."""
    stage = request.param
    plain = zerojax.initialize(model_fn=tiny_llama, config=config(stage, False))
    offloaded = zerojax.initialize(model_fn=tiny_llama, config=config(stage, True))
    plain_losses = [float(plain.train_step(b)["loss"]) for b in batches]
    offloaded_losses = [float(offloaded.train_step(b)["loss"]) for b in batches]
    return stage, plain, offloaded, np.array(plain_losses), np.array(offloaded_losses)


def test_offloaded_run_equals_plain_run(runs):
    _, plain, offloaded, plain_losses, offloaded_losses = runs
    assert offloaded.mesh.shape["data"] == 8
    np.testing.assert_allclose(offloaded_losses, plain_losses, atol=2e-5, rtol=0)
    assert relative_error(offloaded.state.params, plain.state.params) <= 1e-5
    assert relative_error(offloaded.state.opt_state, plain.state.opt_state) <= 1e-5


def test_optimizer_state_stays_in_pinned_host_memory(runs):
    _, plain, offloaded, _, _ = runs
    assert memory_kinds(offloaded.state.opt_state) == {"pinned_host"}
    assert memory_kinds(offloaded.state.params) == {"device"}
    assert memory_kinds(plain.state.opt_state) == {"device"}
    # The layout over the devices is the ZeRO stage's, only the memory differs.
    for a, b in zip(jax.tree.leaves(plain.state.opt_state), jax.tree.leaves(offloaded.state.opt_state)):
        assert a.sharding.spec == b.sharding.spec


def test_compiled_step_moves_the_state_between_host_and_device(runs, batches):
    _, plain, offloaded, _, _ = runs
    leaves = len(jax.tree.leaves(offloaded.state.opt_state))
    lowered = offloaded.lower_train_step(batches[0])
    text = lowered.as_text()
    # Each optimizer-state leaf is a host-memory argument and a host-memory result ...
    assert text.count('mhlo.memory_kind = "pinned_host"') == 2 * leaves
    # ... and the step places each new leaf back on the host.
    assert text.count('_xla_buffer_placement = "pinned_host"') == leaves
    # XLA lays the host-placed entry parameters out in host memory space S(5).
    layout = lowered.compile().as_text().split("entry_computation_layout=", 1)[1].split("\n", 1)[0]
    assert layout.count("S(5)") == 2 * leaves
    plain_text = plain.lower_train_step(batches[0]).as_text()
    assert "pinned_host" not in plain_text and "annotate_device_placement" not in plain_text


def test_memory_report_counts_offloaded_state_as_host(runs):
    _, plain, offloaded, _, _ = runs
    a, b = plain.memory_report(), offloaded.memory_report()
    assert a["host"] == 0 and a["optimizer"] > 0
    assert b["optimizer"] == 0 and b["host"] == a["optimizer"]
    assert b["params"] == a["params"] and b["grads"] == a["grads"]
    assert b["total"] == b["params"] + b["temp"]


@pytest.mark.parametrize("runs", [3], indirect=True)    # the sharded layout; stage 1 restores alike
def test_checkpoints_move_between_offloaded_and_plain(runs, batches, tmp_path):
    stage, plain, offloaded, _, _ = runs
    offloaded.save_checkpoint(str(tmp_path), "offloaded")
    plain.save_checkpoint(str(tmp_path), "plain")
    restored = {}
    for tag, offload, source in (("offloaded", False, offloaded), ("plain", True, plain)):
        engine = zerojax.initialize(model_fn=tiny_llama, config=config(stage, offload))
        engine.load_checkpoint(str(tmp_path), tag)
        assert memory_kinds(engine.state.opt_state) == {"pinned_host" if offload else "device"}
        assert engine.global_steps == STEPS
        assert relative_error(engine.state.opt_state, source.state.opt_state) == 0
        assert relative_error(engine.state.params, source.state.params) == 0
        restored[offload] = engine
    # Training goes on from either restored state alike; the offloaded one stays on the host.
    losses = {k: float(e.train_step(batches[0])["loss"]) for k, e in restored.items()}
    np.testing.assert_allclose(losses[True], losses[False], atol=2e-5, rtol=0)
    assert relative_error(restored[True].state.params, restored[False].state.params) <= 1e-5
    assert memory_kinds(restored[True].state.opt_state) == {"pinned_host"}


def test_pin_memory_false_uses_unpinned_host_memory(batches):
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(1, True, pin_memory=False),
                                abstract=True, example_batch=batches[0])
    assert memory_kinds(engine.state.opt_state) == {"unpinned_host"}
    # The step's results go back to the same memory.
    assert engine.lower_train_step().as_text().count('_xla_buffer_placement = "unpinned_host"') == \
        len(jax.tree.leaves(engine.state.opt_state))


def test_abstract_engine_reports_host_bytes(batches):
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(3, True), abstract=True,
                                example_batch=batches[0])
    assert memory_kinds(engine.state.opt_state) == {"pinned_host"}
    report = engine.memory_report()
    assert report["optimizer"] == 0 and report["host"] > 0


# ---- config -----------------------------------------------------------------------------
def offload_section(**keys) -> dict:
    return {"zero_optimization": {"stage": 2, "offload_optimizer": keys}}


def test_config_cpu_is_accepted_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = Config.load(offload_section(device="cpu", pin_memory=True, ratio=1.0, buffer_count=4,
                                          fast_init=False))
    section = cfg.zero_optimization.offload_optimizer
    assert (section.device, section.pin_memory, section.ratio, section.enabled) == ("cpu", True, 1.0, True)
    assert Config.load(cfg.to_dict()).zero_optimization == cfg.zero_optimization
    # DeepSpeed's defaults: off, not pinned, everything.
    default = Config.load({}).zero_optimization.offload_optimizer
    assert (default.device, default.pin_memory, default.ratio, default.enabled) == ("none", False, 1.0, False)
    assert Config.load(offload_section(device="CPU")).zero_optimization.offload_optimizer.enabled


def test_config_ratio_below_one_warns_by_name():
    with pytest.warns(UnsupportedKeyWarning, match=r"offload_optimizer\.ratio: only ratio 1\.0"):
        cfg = Config.load(offload_section(device="cpu", ratio=0.3))
    assert cfg.zero_optimization.offload_optimizer.ratio == 1.0


@pytest.mark.parametrize("keys, message", [
    ({"device": "gpu"}, r"offload_optimizer\.device: expected one of 'none', 'cpu', 'nvme'"),
    ({"device": "cpu", "ratio": 0}, r"offload_optimizer\.ratio: expected a number > 0, <= 1"),
    ({"device": "cpu", "ratio": 1.5}, r"offload_optimizer\.ratio"),
    ({"device": "cpu", "pin_memory": "yes"}, r"offload_optimizer\.pin_memory: expected true or false"),
    ({"devise": "cpu"}, r"did you mean 'zero_optimization\.offload_optimizer\.device'"),
])
def test_config_bad_offload_values_are_errors(keys, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(offload_section(**keys))


def param_config(stage: int = 3, *, optimizer: bool = True, params: bool = True, **extra) -> dict:
    cfg = config(stage, optimizer)
    if params:
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {**cfg, **extra}


@pytest.fixture(scope="module")
def both_offloaded(batches):
    """ZeRO-3 with params and optimizer state on the host, after STEPS steps."""
    engine = zerojax.initialize(model_fn=tiny_llama, config=param_config())
    losses = np.array([float(engine.train_step(b)["loss"]) for b in batches])
    return engine, losses


@pytest.mark.parametrize("runs", [3], indirect=True)
def test_param_offload_equals_plain_run(runs, both_offloaded, batches):
    _, plain, _, plain_losses, _ = runs
    engine, losses = both_offloaded
    np.testing.assert_allclose(losses, plain_losses, atol=2e-5, rtol=0)
    assert relative_error(engine.state.params, plain.state.params) <= 1e-5
    assert float(engine.eval_step(batches[0])) == pytest.approx(float(plain.eval_step(batches[0])), abs=2e-5)
    # Params and optimizer state live on the host, laid out over the devices as ZeRO-3's.
    assert memory_kinds(engine.state.params) == memory_kinds(engine.state.opt_state) == {"pinned_host"}
    for a, b in zip(jax.tree.leaves(plain.state.params), jax.tree.leaves(engine.state.params)):
        assert a.sharding.spec == b.sharding.spec


@pytest.mark.parametrize("runs", [3], indirect=True)
def test_param_offload_step_moves_params_and_state(runs, both_offloaded, batches):
    _, plain, _, _, _ = runs
    engine, _ = both_offloaded
    state_leaves = len(jax.tree.leaves(engine.state.params)) + len(jax.tree.leaves(engine.state.opt_state))
    text = engine.lower_train_step(batches[0]).as_text()
    assert text.count('mhlo.memory_kind = "pinned_host"') == 2 * state_leaves
    assert text.count('_xla_buffer_placement = "pinned_host"') == state_leaves
    a, b = plain.memory_report(), engine.memory_report()
    assert b["params"] == b["optimizer"] == 0
    assert b["host"] == a["params"] + a["optimizer"]
    assert b["grads"] == a["grads"] and b["total"] == b["temp"]


def test_param_offload_alone_keeps_the_optimizer_on_device(batches):
    engine = zerojax.initialize(model_fn=tiny_llama, config=param_config(optimizer=False),
                                abstract=True, example_batch=batches[0])
    assert memory_kinds(engine.state.params) == {"pinned_host"}
    assert memory_kinds(engine.state.opt_state) == {"device"}


def test_bf16_masters_go_to_the_host_with_the_optimizer(batches):
    """Under bf16 the state's params are the fp32 masters DeepSpeed keeps with the
    offloaded optimizer: they go to the host too, and the run computes the same."""
    bf16 = {"bf16": {"enabled": True}}
    plain = zerojax.initialize(model_fn=tiny_llama, config={**config(2, False), **bf16})
    offloaded = zerojax.initialize(model_fn=tiny_llama, config={**config(2, True), **bf16})
    assert memory_kinds(offloaded.state.params) == {"pinned_host"}
    assert {x.dtype for x in jax.tree.leaves(offloaded.state.params)} == {np.dtype(np.float32)}
    for batch in batches[:2]:
        a, b = float(plain.train_step(batch)["loss"]), float(offloaded.train_step(batch)["loss"])
        assert abs(a - b) <= 1e-5
    assert relative_error(offloaded.state.params, plain.state.params) <= 1e-5
    assert memory_kinds(offloaded.state.params) == {"pinned_host"}


@pytest.mark.parametrize("runs", [3], indirect=True)
def test_checkpoint_of_a_plain_run_restores_with_params_on_the_host(runs, tmp_path):
    stage, plain, _, _, _ = runs
    plain.save_checkpoint(str(tmp_path), "plain")
    engine = zerojax.initialize(model_fn=tiny_llama, config=param_config())
    engine.load_checkpoint(str(tmp_path), "plain")
    assert memory_kinds(engine.state.params) == {"pinned_host"}
    assert relative_error(engine.state.params, plain.state.params) == 0
    assert relative_error(engine.state.opt_state, plain.state.opt_state) == 0


def test_config_offload_param_cpu_is_accepted_with_deepspeed_buffer_keys():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = Config.load({"zero_optimization": {"stage": 3, "offload_param": {
            "device": "CPU", "pin_memory": True, "buffer_count": 5, "buffer_size": 1e8, "max_in_cpu": 1e9}}})
    section = cfg.zero_optimization.offload_param
    assert (section.device, section.pin_memory, section.enabled) == ("cpu", True, True)
    assert Config.load(cfg.to_dict()).zero_optimization == cfg.zero_optimization
    assert not Config.load({}).zero_optimization.offload_param.enabled


@pytest.mark.parametrize("zero, message", [
    ({"stage": 2, "offload_param": {"device": "cpu"}}, r"offload_param needs ZeRO stage 3.*got stage 2"),
    ({"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp/x"}},
     r'offload_param\.device: "nvme" .*not supported.*offload_optimizer\.device "nvme"'),
    ({"stage": 3, "offload_param": {"device": "disk"}}, r"offload_param\.device: expected one of"),
    ({"stage": 3, "offload_param": {"device": "cpu", "pin_memory": 1}}, r"offload_param\.pin_memory"),
])
def test_config_bad_offload_param_is_an_error(zero, message):
    with pytest.raises(ConfigError, match=message):
        Config.load({"zero_optimization": zero})


def test_offloaded_update_streams_one_layer_at_a_time(runs, batches):
    _, plain, offloaded, _, _ = runs
    assert offloaded.step_spec.stream_offloaded_update and not plain.step_spec.stream_offloaded_update
    # One more loop than the plain step: the update's scan over the stacked layers.
    loops = lambda e: e.lower_train_step(batches[0]).as_text().count("stablehlo.while")
    assert loops(offloaded) == loops(plain) + 1


def test_lamb_moves_the_state_whole_instead():
    cfg = config(1, True)
    cfg["optimizer"] = {"type": "Lamb", "params": {"lr": 1e-3}}
    engine = zerojax.initialize(model_fn=tiny_llama, config=cfg, abstract=True)
    assert not engine.step_spec.stream_offloaded_update       # its trust ratio is per whole tensor


def test_fp16_overflow_keeps_the_streamed_state(batches):
    """An overflowing fp16 step is skipped inside the streamed update: params and state unchanged."""
    cfg = {**config(1, True), "fp16": {"enabled": True, "initial_scale_power": 40}}
    engine = zerojax.initialize(model_fn=tiny_llama, config=cfg)
    assert engine.step_spec.stream_offloaded_update
    before = jax.tree.map(np.asarray, (engine.state.params, engine.state.opt_state))
    metrics = engine.train_step(batches[0])
    assert bool(metrics["skipped"]) and int(engine.state.step) == 0
    assert relative_error(engine.state.params, before[0]) == 0
    assert relative_error(engine.state.opt_state, before[1]) == 0
    assert memory_kinds(engine.state.opt_state) == {"pinned_host"}
