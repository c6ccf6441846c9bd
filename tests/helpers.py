"""Shared builders for tests: tiny models, batches and an independent single-device reference."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zerojax import compute
from zerojax.models import Llama, LlamaConfig

# Every dimension divides 8, so every ZeRO layout shards every tensor evenly.
TINY_LLAMA = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
SEQ = 16


def tiny_llama(rngs: nnx.Rngs) -> Llama:
    return Llama(TINY_LLAMA, rngs=rngs)


def token_batches(count: int, rows: int, seq: int = SEQ, vocab: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, size=(rows, seq), dtype=np.int32)} for _ in range(count)]


class PlainMLP(nnx.Module):
    """A user's module with no sharding annotations; odd sizes on purpose."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(12, 40, rngs=rngs)
        self.out = nnx.Linear(40, 3, rngs=rngs)

    def __call__(self, batch):
        h = jax.nn.gelu(self.hidden(batch["x"]))
        pred = self.out(h)
        loss = jnp.mean((pred - batch["y"]) ** 2)
        if "scale" in batch:  # lets a test inject an overflow
            loss = loss * jnp.mean(batch["scale"])
        return loss, {"pred_mean": jnp.mean(pred)}


def mlp_batches(count: int, rows: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(rows, 12)).astype(np.float32),
             "y": rng.normal(size=(rows, 3)).astype(np.float32)} for _ in range(count)]


def reference_run(model_fn, tx: optax.GradientTransformation, batches, eval_batch, *,
                  dtype=jnp.float32, clip: float = 1.0):
    """The plain single-device JAX loop the engine must reproduce: losses, eval loss, params."""
    device = jax.devices()[0]
    model = model_fn(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(nnx.to_pure_dict(params), device)
    rest = nnx.to_pure_dict(rest)
    casts_per_layer = getattr(model, "zerojax_casts_per_layer", False)

    def loss_fn(p, batch):
        with compute.use(compute.ComputePolicy(dtype=dtype)):
            if not casts_per_layer:
                p = jax.tree.map(compute.cast, p)
            out = nnx.merge(graphdef, p, rest)(batch)
        return jnp.asarray(out[0] if isinstance(out, tuple) else out, jnp.float32)

    @jax.jit
    def step(p, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        norm = optax.tree.norm(grads)
        if clip > 0:
            grads = jax.tree.map(lambda g: g * jnp.minimum(clip / (norm + 1e-6), 1.0), grads)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for batch in batches:
        params, opt_state, loss = step(params, opt_state, jax.device_put(batch, device))
        losses.append(float(loss))
    eval_loss = float(jax.jit(loss_fn)(params, jax.device_put(eval_batch, device)))
    return np.array(losses), eval_loss, params


def relative_error(a, b) -> float:
    """Relative norm of the difference of two pytrees of arrays (compared on the host)."""
    xs = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    ys = [np.asarray(y, np.float64) for y in jax.tree.leaves(b)]
    diff = sum(float(np.sum((x - y) ** 2)) for x, y in zip(xs, ys))
    return (diff / sum(float(np.sum(y ** 2)) for y in ys)) ** 0.5


@contextlib.contextmanager
def compile_events():
    """Count the executables XLA produces inside the block: fresh compiles plus loads from
    the persistent compilation cache (the suite shares one, see conftest.py), so a test
    that asserts "this compiles once, then never again" holds whichever test ran first."""
    events: list[str] = []

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append("compile")

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            events.append("cache hit")

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
