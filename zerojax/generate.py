"""Sampling from a trained checkpoint of a reference model (byte-level or token ids)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from zerojax import checkpoint, models
from zerojax.errors import CheckpointError


def load_model(root: str, tag: str | None = None) -> nnx.Module:
    """The model of a checkpoint with its trained params, on one device; no optimizer state."""
    tag = checkpoint.resolve_tag(root, tag)
    meta = checkpoint.read_meta(root, tag)
    if not meta.get("model"):
        raise CheckpointError(f"checkpoint {os.path.join(root, tag)} has no model section "
                              f"(it was not trained from a zerojax.models config), so it cannot be rebuilt")
    abstract = nnx.eval_shape(lambda: models.build(meta["model"], nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    device = NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("d",)), PartitionSpec())
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
                          nnx.to_pure_dict(params))
    checkpoint.check_params_match(meta, checkpoint.to_nested(target), os.path.join(root, tag))
    restored = checkpoint.restore(root, tag, {"params": checkpoint.to_nested(target)})["params"]
    return nnx.merge(graphdef, checkpoint.from_nested(target, restored), nnx.to_pure_dict(rest))


def sample(model: nnx.Module, prompt_ids: np.ndarray, *, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int | None = 40, seed: int = 0) -> np.ndarray:
    """Autoregressive sampling; returns the new token ids. temperature 0 is greedy.

    The whole window is recomputed per token (no KV cache): simple, and fine for the
    small models one samples from on a CPU.
    """
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    total = prompt.size + max_new_tokens
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, buffer, position, key):
        logits = nnx.merge(graphdef, state).logits(buffer[None])[0, position - 1]
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    buffer = jnp.zeros((total,), jnp.int32).at[: prompt.size].set(prompt)
    key = jax.random.key(seed)
    for position in range(prompt.size, total):
        key, sub = jax.random.split(key)
        token = next_token(state, buffer, position, sub)
        buffer = buffer.at[position].set(token)
    return np.asarray(buffer[prompt.size:])
