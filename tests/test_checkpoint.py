"""Checkpoints: exact resume on any layout, atomic `latest`, clear errors, streamed export."""
# Params compared bitwise here are bytes a checkpoint copied (save -> restore, export): an
# identity on any CPU. Losses after a resume come from another compiled program (another
# stage or device count), so they are compared within DESIGN.md's ZeRO tolerance.
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

import zerojax
from zerojax.checkpoint import export_safetensors, latest_tag
from zerojax.errors import CheckpointError
from tests.helpers import PlainMLP, mlp_batches, tiny_llama, token_batches


def config(stage: int, **extra) -> dict:
    return {"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, **extra}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """ZeRO-3 on 8 devices: 3 steps, a checkpoint, then 3 more steps as the uninterrupted reference."""
    root = str(tmp_path_factory.mktemp("ckpt"))
    batches = token_batches(6, 16)
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(3))
    for b in batches[:3]:
        engine.train_step(b)
    path = engine.save_checkpoint(root, client_state={"next_batch": 3})
    params_at_save = jax.tree.map(np.asarray, engine.state.params)
    losses = [float(engine.train_step(b)["loss"]) for b in batches[3:]]
    return root, path, batches, losses, params_at_save


def test_layout_and_latest(saved_run):
    root, path, *_ = saved_run
    assert path == os.path.join(root, "global_step3")
    assert latest_tag(root) == "global_step3"
    assert not [n for n in os.listdir(root) if n.startswith(".")]


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_in_process_on_another_stage(saved_run, stage):
    root, _, batches, losses, params_at_save = saved_run
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(stage))
    _, client_state = engine.load_checkpoint(root)
    assert client_state == {"next_batch": 3} and engine.global_steps == 3
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, engine.state.params), params_at_save)
    resumed = [float(engine.train_step(b)["loss"]) for b in batches[3:]]
    np.testing.assert_allclose(resumed, losses, atol=2e-5, rtol=0)


def test_module_only_load_keeps_a_fresh_optimizer(saved_run):
    root, _, _, _, params_at_save = saved_run
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(1))
    engine.load_checkpoint(root, load_module_only=True)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, engine.state.params), params_at_save)
    assert int(engine.state.step) == 0 and engine.global_steps == 0


@pytest.mark.slow
def test_resume_with_other_device_counts(saved_run, run_worker, tmp_path):
    """Saved as ZeRO-3 on 8 devices; loaded as ZeRO-1 on 4 devices and stage 0 on 1 device."""
    root, _, _, losses, _ = saved_run
    for devices, stage in [(4, 1), (1, 0)]:
        out = tmp_path / f"losses{devices}.json"
        run_worker("resume", "--devices", devices, "--stage", stage, "--ckpt", root,
                   "--first-batch", 3, "--steps", 3, "--out", out)
        np.testing.assert_allclose(json.loads(out.read_text()), losses, atol=2e-5, rtol=0)


def test_export_streams_consolidated_weights(saved_run, tmp_path):
    from safetensors.numpy import load_file
    root, _, _, _, params_at_save = saved_run
    out = export_safetensors(root, str(tmp_path / "model.safetensors"))
    tensors = load_file(out)
    np.testing.assert_array_equal(tensors["layers.q_proj"], params_at_save["layers"]["q_proj"])
    np.testing.assert_array_equal(tensors["embed_tokens"], params_at_save["embed_tokens"])
    assert len(tensors) == len(jax.tree.leaves(params_at_save))
    bf16 = load_file(export_safetensors(root, str(tmp_path / "bf16.safetensors"), dtype="bfloat16"))
    assert str(bf16["norm"].dtype) == "bfloat16"


def test_async_save_lets_training_continue(tmp_path):
    engine = zerojax.initialize(model_fn=PlainMLP, config=config(1))
    batches = mlp_batches(4, 16)
    engine.train_step(batches[0])
    expected = jax.tree.map(np.asarray, engine.state.params)
    engine.save_checkpoint(str(tmp_path), async_save=True)
    for b in batches[1:]:          # donates the state buffers while the save may still run
        engine.train_step(b)
    engine.wait_for_checkpoint()
    assert latest_tag(str(tmp_path)) == "global_step1"
    fresh = zerojax.initialize(model_fn=PlainMLP, config=config(1))
    fresh.load_checkpoint(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, fresh.state.params), expected)


def test_max_to_keep_and_keep_every(tmp_path):
    engine = zerojax.initialize(model_fn=PlainMLP, config=config(
        0, zerojax={"train": {"max_to_keep": 2, "keep_every": 3}}))
    for b in mlp_batches(5, 16):
        engine.train_step(b)
        engine.save_checkpoint(str(tmp_path))
    kept = sorted(n for n in os.listdir(tmp_path) if n.startswith("global_step"))
    # Steps 1..5: 3 is kept forever, and the newest two besides it.
    assert kept == ["global_step3", "global_step4", "global_step5"]


def test_errors_name_the_problem(saved_run, tmp_path):
    root, path, *_ = saved_run
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(0))
    with pytest.raises(CheckpointError, match="does not exist"):
        engine.load_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        engine.load_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="'global_step99' not found.*global_step3"):
        engine.load_checkpoint(root, tag="global_step99")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        zerojax.initialize(model_fn=PlainMLP, config=config(0)).load_checkpoint(root)
    with pytest.raises(CheckpointError, match="JSON"):
        engine.save_checkpoint(str(tmp_path / "x"), client_state={"array": np.zeros(2)})
    with pytest.raises(CheckpointError, match="invalid checkpoint tag"):
        engine.save_checkpoint(str(tmp_path / "x"), tag="../evil")


def test_truncated_and_partial_checkpoints(saved_run, tmp_path):
    root, path, *_ = saved_run
    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(0))
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(broken, "global_step3", "state"))
                  for f in fs if os.path.getsize(os.path.join(d, f)) > 1000 and "/d/" in os.path.join(d, f) + "/"]
    assert data_files
    for f in data_files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError, match="could not read checkpoint .*global_step3"):
        engine.load_checkpoint(broken)
    os.remove(os.path.join(broken, "global_step3", "zerojax_meta.json"))
    with pytest.raises(CheckpointError, match="incomplete"):
        engine.load_checkpoint(broken)


def test_fp32_checkpoint_resumes_in_bf16(saved_run):
    """Another precision is just another engine: fp32 master params load as they are."""
    root, _, batches, losses, params_at_save = saved_run
    engine = zerojax.initialize(model_fn=tiny_llama, config=config(3, bf16={"enabled": True}))
    engine.load_checkpoint(root)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, engine.state.params), params_at_save)
    resumed = [float(engine.train_step(b)["loss"]) for b in batches[3:]]
    np.testing.assert_allclose(resumed, losses, atol=2e-2, rtol=0)   # bf16 compute vs fp32


def test_relative_directories_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = zerojax.initialize(model_fn=PlainMLP, config=config(0))
    engine.train_step(mlp_batches(1, 16)[0])
    engine.save_checkpoint("runs/rel")
    assert latest_tag("runs/rel") == "global_step1"
    engine.load_checkpoint("runs/rel")
    export_safetensors("runs/rel", "weights.safetensors")
