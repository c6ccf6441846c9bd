"""configs/ recipes and examples/ scripts: every recipe parses, builds and trains; examples exit 0."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

import zerojax
from zerojax.trainer import model_fn_from_config, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))
RUNNABLE = [p for p in CONFIGS if os.path.basename(p) != "finetune_hf.json"]
# Recipes whose point is a code path of their own (precision, accumulation) train 2 steps here;
# the ZeRO stage recipes differ from tiny.json (trained in test_train.py) only in a number the
# engine tests already cover.
RECIPES = [p for p in RUNNABLE if os.path.basename(p) in ("bf16.json", "fp16.json", "gas.json")]
SMALL = {"zerojax.model.hidden_size": 32, "zerojax.model.intermediate_size": 64,
         "zerojax.model.num_hidden_layers": 2, "zerojax.model.num_attention_heads": 2,
         "zerojax.model.num_key_value_heads": 1, "zerojax.model.max_position_embeddings": 32,
         "zerojax.data.seq_len": 32,
         "zerojax.data.corpus": os.path.join(ROOT, "README.md")}   # small text: no 8 MB stdlib walk
EXPECTED = {"zero0.json": {"stage": 0}, "zero1.json": {"stage": 1}, "zero2.json": {"stage": 2},
            "zero3.json": {"stage": 3}, "bf16.json": {"stage": 2, "bf16": True},
            "fp16.json": {"stage": 2, "fp16": True}, "gas.json": {"stage": 2, "gas": 2}}


def test_recipe_set_is_complete():
    names = {os.path.basename(p) for p in CONFIGS}
    assert set(EXPECTED) | {"tiny.json", "finetune_hf.json"} <= names
    readme = open(os.path.join(ROOT, "configs", "README.md")).read()
    for name in names:
        assert name in readme, f"configs/README.md does not mention {name}"


@pytest.mark.parametrize("path", RUNNABLE, ids=os.path.basename)
def test_config_parses_and_builds_model(path):
    config = zerojax.Config.load(path)
    model_fn, section = model_fn_from_config(config)
    assert callable(model_fn) and section["type"] == "llama"
    want = EXPECTED.get(os.path.basename(path), {})
    assert config.zero_optimization.stage == want.get("stage", config.zero_optimization.stage)
    assert config.bf16.enabled == want.get("bf16", False)
    assert config.fp16.enabled == want.get("fp16", False)
    if config.fp16.enabled:
        assert config.fp16.loss_scale == 0 and config.fp16.initial_scale_power == 16
    if config.zero_optimization.stage == 3:
        assert config.zero_optimization.stage3_param_persistence_threshold == 0
    if "gas" in want:
        assert config.train_batch_size is None
        assert config.gradient_accumulation_steps == want["gas"] and config.train_micro_batch_size_per_gpu


def test_finetune_hf_parses_and_needs_a_directory():
    config = zerojax.Config.load(os.path.join(ROOT, "configs", "finetune_hf.json"))
    assert config.zerojax.model["init_from"] == "path/to/hf_dir"
    with pytest.raises(zerojax.ConfigError):        # the placeholder directory does not exist
        model_fn_from_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_trains_two_steps(path, tmp_path):
    config = zerojax.Config.load(path).with_overrides(SMALL)
    out = str(tmp_path / "run")
    summary = train(None, config, steps=2, out=out, eval_data=[])   # no eval: one compile fewer
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, filter(str.strip, f)) if "tokens_per_s" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [("own_module.py", []), ("train_loop.py", ["OUT"])])
def test_example_runs(script, args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = subprocess.run([sys.executable, os.path.join("examples", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
