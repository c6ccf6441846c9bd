"""zerojax.deepspeed: DeepSpeed's initialize 4-tuple and the engine loop (forward, backward, step).

The loop must reproduce the fused `train_step` on the same rows (ZeRO 0-3, gas 1 and 2),
with DeepSpeed's counters: lr and global_steps move only at boundaries, fp16 overflow
steps are skipped. One engine per configuration (module fixtures): each compiles the
loop's programs and the fused step once, and the facade tests reuse them.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import zerojax.deepspeed as deepspeed
from zerojax.config import ConfigError
from zerojax.safetensors_io import open_checkpoint_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO, DEVICES = 2, 8
ROWS = MICRO * DEVICES            # rows of one micro-batch (micro × data-parallel)


class MLP(nnx.Module):
    """A user's module; every size divides 8, so ZeRO shards every tensor."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(16, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, batch):
        x = batch["x"].astype(self.fc1.kernel.dtype)        # compute in the engine's dtype
        pred = self.fc2(jax.nn.gelu(self.fc1(x)))
        return jnp.mean((pred - batch["y"].astype(pred.dtype)) ** 2)


def config(stage: int, gas: int, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            # Linear warm-up: the lr differs at every applied step (DeepSpeed's sequence
            # repeats the first value: 1e-3, 1e-3, 3.25e-3, ...).
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2,
                                                         "warmup_num_steps": 4, "warmup_type": "linear"}},
            "gradient_clipping": 0.5,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, **extra}


def global_batches(count: int, gas: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(ROWS * gas, 16)).astype(np.float32),
             "y": rng.normal(size=(ROWS * gas, 16)).astype(np.float32)} for _ in range(count)]


def micro_batches(batch: dict, gas: int) -> list[dict]:
    """train_step's split: row r of the global batch is in micro-batch r % gas."""
    return [{k: v[m::gas] for k, v in batch.items()} for m in range(gas)]


def rel_norm(a, b) -> float:
    num = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(np.sum(np.asarray(y) ** 2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5


def host(tree):
    return jax.tree.map(np.asarray, tree)


_ENGINES: dict = {}


@pytest.fixture(scope="module")
def engines():
    """(stage, gas, fp16) -> engine, built on first use and shared by the module's tests."""
    def get(stage: int, gas: int, **extra):
        key = (stage, gas, json.dumps(extra, sort_keys=True))
        if key not in _ENGINES:
            with deepspeed.zero.Init():       # the class is built directly into its shards
                engine, *_ = deepspeed.initialize(model=MLP, config=config(stage, gas, **extra))
            _ENGINES[key] = engine
        return _ENGINES[key]
    yield get
    _ENGINES.clear()


def run_loop(engine, batches, gas):
    """DeepSpeed's loop over the global batches; the counters after every step()."""
    losses, trace = [], []
    for batch in batches:
        for micro in micro_batches(batch, gas):
            boundary = engine.is_gradient_accumulation_boundary()
            loss = engine(micro)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
            trace.append((boundary, engine.global_steps, engine.get_lr()[0], engine.was_step_applied()))
    return losses, trace


# Pairwise: every stage, both gas values at the sharded-gradient stages 2 and 3.
@pytest.mark.parametrize("stage,gas", [(0, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)])
def test_loop_matches_train_step(engines, stage, gas):
    engine = engines(stage, gas)
    start = jax.tree.map(jnp.copy, engine.state)
    batches = global_batches(2, gas)
    losses, trace = run_loop(engine, batches, gas)
    loop_params = host(engine.state.params)

    # The fused step from the same start on the same rows.
    engine.state, engine.global_steps, engine.micro_steps = start, 0, 0
    fused = [engine.train_step(b) for b in batches]
    fused_losses = [float(m["loss"]) for m in fused]
    assert rel_norm(loop_params, host(engine.state.params)) <= 2e-5
    loop_step_losses = [float(np.mean(losses[i * gas:(i + 1) * gas])) for i in range(len(batches))]
    np.testing.assert_allclose(loop_step_losses, fused_losses, atol=2e-5)

    # lr and global_steps move at the boundaries only: (boundary, global_steps, next lr, applied).
    lrs = [1e-3, 1e-3, 1e-3 + 9e-3 / 4]
    expected = []
    for step in range(len(batches)):
        expected += [(False, step, lrs[step], False)] * (gas - 1) + [(True, step + 1, lrs[step + 1], True)]
    assert [t[:2] + t[3:] for t in trace] == [e[:2] + e[3:] for e in expected]
    np.testing.assert_allclose([t[2] for t in trace], [e[2] for e in expected], rtol=1e-6)
    assert engine.global_steps == len(batches) and engine.skipped_steps == 0
    if stage >= 2:      # gradients accumulate sharded over the data axis
        assert all("data" in str(s.spec) for s in jax.tree.leaves(engine.layout.shardings(engine.layout.grads)))
    if stage == 3:      # zero.Init(): params were created in their shards
        assert "data" in str(engine.state.params["fc1"]["kernel"].sharding.spec)


def test_fp16_overflow_is_skipped_as_in_deepspeed(engines, tmp_path):
    # 2^32 overflows fp16 at once; hysteresis 1 halves the scale on the first overflow.
    engine = engines(1, 2, fp16={"enabled": True, "initial_scale_power": 32, "hysteresis": 1})
    params, lr = host(engine.state.params), engine.get_lr()
    batch = global_batches(1, 2)[0]
    for micro in micro_batches(batch, 2):
        loss = engine(micro)
        assert np.isfinite(float(loss))            # the unscaled loss
        engine.backward(loss)
        engine.step()
    assert not engine.was_step_applied()
    assert engine.global_steps == 1 and engine.skipped_steps == 1      # DeepSpeed counts skipped steps
    assert engine.get_loss_scale() == 2.0 ** 31
    assert engine.get_lr() == lr                   # the schedule does not advance
    assert rel_norm(host(engine.state.params), params) == 0.0
    assert not np.isfinite(engine.get_global_grad_norm())

    # save_16bit_model: the params in the training dtype (fp16), by their tree names.
    path = engine.save_16bit_model(str(tmp_path), "pytorch_model.bin")
    assert path.endswith("pytorch_model.safetensors")
    with open_checkpoint_dir(str(tmp_path), prefix="pytorch_model") as reader:
        assert sorted(reader.names()) == ["fc1.bias", "fc1.kernel", "fc2.bias", "fc2.kernel"]
        assert reader.dtype("fc1.kernel") == np.float16
        np.testing.assert_array_equal(reader.read("fc1.kernel"), params["fc1"]["kernel"].astype(np.float16))


def test_backward_needs_the_last_forward(engines):
    engine = engines(2, 2)
    with pytest.raises(RuntimeError, match="missing forward.*loss = engine\\(batch\\) first"):
        engine.backward(jnp.zeros(()))
    micro = micro_batches(global_batches(1, 2, seed=3)[0], 2)
    loss = engine(micro[0])
    with pytest.raises(RuntimeError, match="missing forward.*not the loss"):
        engine.backward(loss * 1.0)
    engine.backward(loss)
    with pytest.raises(RuntimeError, match="missing forward"):
        engine.backward(loss)                      # twice: its gradients are already in
    engine.step()
    assert engine.is_gradient_accumulation_boundary() and not engine.was_step_applied()
    with pytest.raises(RuntimeError, match="middle of gradient accumulation"):
        engine.save_checkpoint("/nonexistent")
    loss = engine(micro[1])
    engine.backward(loss)
    engine.step()
    assert engine.was_step_applied()
    with pytest.raises(ValueError, match="one micro-batch of 16 rows"):
        engine(global_batches(1, 2)[0])


def test_eval_mode_module_and_checkpoints(engines, tmp_path):
    engine = engines(2, 2)
    batch = global_batches(1, 1, seed=5)[0]
    steps, micro = engine.global_steps, engine.micro_steps
    loss = engine.eval()(batch)
    np.testing.assert_allclose(float(loss), float(engine.module(batch)), rtol=1e-6)
    with pytest.raises(RuntimeError, match="eval mode"):
        engine.backward(loss)
    assert (engine.global_steps, engine.micro_steps) == (steps, micro)
    engine.train()

    engine.save_checkpoint(str(tmp_path), client_state={"epoch": 3})
    saved = host(engine.state.params)
    for m in micro_batches(global_batches(1, 2, seed=6)[0], 2):
        engine.backward(engine(m))
        engine.step()
    path, client_state = engine.load_checkpoint(str(tmp_path))
    assert os.path.basename(path) == f"global_step{steps}" and client_state == {"epoch": 3}
    assert engine.global_steps == steps and rel_norm(host(engine.state.params), saved) == 0.0


def test_initialize_returns_deepspeed_tuple(tmp_path):
    examples = [{"x": np.full((16,), i, np.float32), "y": np.zeros((16,), np.float32)} for i in range(40)]
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config(2, 2)))
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    assert args.deepspeed and args.deepspeed_config == str(path)

    schedule = optax.linear_schedule(0.1, 0.0, 10)
    collated = []

    def collate(rows):
        collated.append(len(rows))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    with pytest.warns(UserWarning, match="lr_scheduler= replaces the config's WarmupLR"):
        engine, optimizer, loader, lr_scheduler = deepspeed.initialize(
            args=args, model=MLP(nnx.Rngs(0)), model_parameters=object(), training_data=examples,
            optimizer=optax.sgd, lr_scheduler=schedule, collate_fn=collate)
    assert isinstance(engine, deepspeed.DeepSpeedEngine)
    assert (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()) == (MICRO, 2)

    # The dataloader: micro × data-parallel rows per batch, in order, last partial batch dropped.
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and collated == [ROWS, ROWS]
    np.testing.assert_array_equal(batches[1]["x"][:, 0], np.arange(ROWS, 2 * ROWS))

    # The optimizer callable got the schedule; lr follows it by applied steps.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert lr_scheduler.get_lr() == lr_scheduler.get_last_lr() == [pytest.approx(0.1)]
    before = host(engine.state.params)
    for batch in batches:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        lr_scheduler.step()                        # a no-op: the engine drives the schedule
    assert engine.global_steps == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(float(schedule(1)))
    assert lr_scheduler.get_last_lr() == [pytest.approx(float(schedule(1)))]
    assert rel_norm(host(engine.state.params), before) > 0

    # A dict of arrays is data too; config_params is DeepSpeed's alias of config.
    data = {"x": np.zeros((ROWS * 3 + 1, 16), np.float32), "y": np.zeros((ROWS * 3 + 1, 16), np.float32)}
    assert [b["x"].shape for b in deepspeed.DeepSpeedDataLoader(data, ROWS)] == [(ROWS, 16)] * 3
    with pytest.raises(ConfigError, match="both in args.deepspeed_config"):
        deepspeed.initialize(args=args, model=MLP, config_params=config(0, 1))
    with pytest.raises(ConfigError, match="needs a DeepSpeed config"):
        deepspeed.initialize(model=MLP)


def test_example_script_runs(monkeypatch, capsys):
    script = os.path.join(ROOT, "examples", "deepspeed_loop.py")
    monkeypatch.setattr(sys, "argv", [script, "--deepspeed", "--deepspeed_config",
                                      os.path.join(ROOT, "examples", "ds_config.json"), "--epochs", "2"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "global_steps" in out
