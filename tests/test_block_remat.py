"""Remat per block for a user's module (zerojax.block_remat): which blocks, what they keep
for the backward pass, the compiler's temp bytes, and the same function as no remat."""
from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zerojax
from zerojax import block_remat
from zerojax.step import model_loss

from tests.helpers import relative_error

WIDTH, HEADS, SEQ = 32, 2, 16


class Block(nnx.Module):
    """A pre-LN transformer block as a user writes it: no zerojax calls."""

    def __init__(self, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(WIDTH, rngs=rngs)
        # No bias: a key bias has a zero gradient in exact math, which Adam turns into
        # lr-sized steps of rounding noise (no use comparing two programs on it).
        self.qkv = nnx.Linear(WIDTH, 3 * WIDTH, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.up = nnx.Linear(WIDTH, 4 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(4 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(self.ln_1(x)).reshape(b, t, HEADS, -1), 3, axis=-1)
        x = x + self.proj(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, WIDTH))
        return x + self.down(jax.nn.gelu(self.up(self.ln_2(x))))


class UserStack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, layers: int = 4):
        self.embed = nnx.Linear(4, WIDTH, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
        self.head = nnx.Linear(WIDTH, 4, rngs=rngs)

    def __call__(self, batch):
        x = self.embed(batch["x"])
        for block in self.blocks:
            x = block(x)
        return jnp.mean((self.head(x) - batch["y"]) ** 2)


class Nested(nnx.Module):
    """Two stages of two blocks each, both stages of one class: the stages are the blocks."""

    def __init__(self, rngs: nnx.Rngs):
        self.stages = nnx.List([UserStack(rngs, layers=2) for _ in range(2)])
        self.single = nnx.List([nnx.Linear(2, 2, rngs=rngs)])


def batches(count: int, rows: int = 8) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(rows, SEQ, 4)).astype(np.float32),
             "y": rng.normal(size=(rows, SEQ, 4)).astype(np.float32)} for _ in range(count)]


def engine(remat: str, stage: int = 0, mesh: int = 1) -> zerojax.Engine:
    return zerojax.initialize(model_fn=UserStack, config={
        "train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zerojax": {"remat": remat, "mesh": {"data": mesh}}}, example_batch=batches(1)[0])


def test_finds_the_outermost_repeated_blocks():
    assert [type(b).__name__ for b in block_remat.repeated_blocks(UserStack(nnx.Rngs(0)))] == ["Block"] * 4
    nested = Nested(nnx.Rngs(0))
    found = block_remat.repeated_blocks(nested)
    assert [type(b).__name__ for b in found] == ["UserStack"] * 2     # not their inner blocks, nor a lone Linear
    assert block_remat.repeated_blocks(nnx.Linear(2, 2, rngs=nnx.Rngs(0))) == []


def test_cpu_auto_remats_each_block_where_a_process_runs_several_devices():
    assert engine("auto", stage=3, mesh=8).step_spec.block_remat is not None
    assert engine("auto").step_spec.block_remat is None       # one device: the compile is the peak
    assert engine("minimal").step_spec.block_remat is not None  # asked for
    assert engine("none", mesh=8).step_spec.block_remat is None


def test_minimal_keeps_only_dot_outputs_of_each_block():
    """Under "minimal" per block, of what a block computes the backward pass keeps its matmul
    outputs and its output (the next block's input) only, and recomputes the element-wise
    work (LayerNorm, attention softmax, GELU)."""
    auto, plain = engine("minimal"), engine("none")
    assert auto.step_spec.whole_model_remat is None
    batch = batches(1)[0]

    def kept_by_blocks(spec) -> list[str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(
                lambda p: model_loss(spec, p, auto.state.model_state, batch)[0], jax.device_get(auto.state.params))
        return [line for line in out.getvalue().splitlines() if "(Block.__call__)" in line]

    kept = kept_by_blocks(auto.step_spec)
    others = [line for line in kept if "output of dot_general" not in line]
    assert len(kept) > len(others) == 4 and all("output of add" in line for line in others), kept
    everything = kept_by_blocks(plain.step_spec)
    assert len(everything) > 2 * len(kept), everything


def test_block_remat_cuts_the_compilers_temp_bytes():
    """XLA:CPU drops jax.checkpoint's optimization barrier and CSE merges the recomputation
    back (a plain checkpoint leaves the temp bytes as they were); `checkpoint_without_cse`
    keeps it a recomputation."""
    none = engine("none").memory_report()["temp"]
    assert engine("minimal").memory_report()["temp"] < 0.8 * none
    assert engine("full").memory_report()["temp"] < engine("minimal").memory_report()["temp"]


def test_block_remat_trains_the_same_function():
    """Per-block remat vs none on the same layout (one device; ZeRO-3 over 8 devices):
    losses and params within DESIGN.md's same-math bounds."""
    data = batches(3)

    def run(remat, stage, mesh):
        e = engine(remat, stage, mesh)
        return [float(e.train_step(b)["loss"]) for b in data], jax.device_get(e.state.params)

    for remats, stage, mesh in ((("minimal",), 0, 1), (("auto",), 3, 8)):
        want_losses, want_params = run("none", stage, mesh)
        for remat in remats:
            losses, params = run(remat, stage, mesh)
            np.testing.assert_allclose(losses, want_losses, atol=2e-5, rtol=0)
            assert relative_error(params, want_params) <= 1e-5
