"""Where serving weights come from, placed directly in the inference layout.

A source is a zerojax checkpoint root (any layout it was trained in: checkpoints hold
canonical params), a Hugging Face Llama / GPT-2 directory, a live training `Engine` (its
current params, resharded on device, never through the host), or an `nnx.Module`.
Params land in the inference layout: the model's logical axes through the partition
rules on a mesh whose only non-trivial axis is `tensor` (Megatron's layout).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from zerojax import checkpoint, models, partition
from zerojax.config import ConfigError
from zerojax.errors import CheckpointError
from zerojax.inference import tokenizer as tok
from zerojax.mesh import AXES

# The serving protocol: what a model must have to be served (the reference models do).
PROTOCOL = ("embed", "run_layers_cached", "head_logits", "kv_geometry")


@dataclasses.dataclass
class Loaded:
    graphdef: Any
    params: Any               # nested pure dict of jax.Arrays in the inference layout
    rest: Any                 # non-param module state (pure dict)
    module: nnx.Module        # abstract or live module (protocol checks, geometry)
    tokenizer: Any            # None: token-id prompts only
    mesh: Mesh
    rules: dict
    shardings: Any            # of params


def inference_mesh(tensor_parallel: int, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if not isinstance(tensor_parallel, int) or isinstance(tensor_parallel, bool) or tensor_parallel < 1:
        raise ConfigError(f"tensor_parallel must be an int >= 1, got {tensor_parallel!r}")
    if tensor_parallel > len(devices):
        raise ConfigError(f"tensor_parallel={tensor_parallel} needs {tensor_parallel} devices; "
                          f"{len(devices)} are available")
    shape = (1, 1, 1, 1, tensor_parallel)
    return Mesh(np.asarray(devices[:tensor_parallel]).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 5)


def check_protocol(module: nnx.Module) -> None:
    missing = [name for name in PROTOCOL if not callable(getattr(module, name, None))]
    if missing:
        raise ConfigError(
            f"{type(module).__name__} cannot be served: it has no {', '.join(missing)}. Implement "
            f"kv_geometry() -> layers.KVGeometry, embed(ids, positions), head_logits(x) and "
            f"run_layers_cached(x, positions, kv) (e.g. with zerojax.models.layers.scan_layers_cached), "
            f"as zerojax.models.Llama does")


def serving_layout(abstract_module: nnx.Module, mesh: Mesh):
    _, params_state, _ = nnx.split(abstract_module, nnx.Param, ...)
    logical = partition.logical_axes(params_state)
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(params_state))
    rules = partition.fit_rules(abstract, logical, mesh)
    layout = partition.make_layout(abstract, logical, mesh, 0, rules=rules)
    return abstract, rules, layout.shardings(layout.compute)


def load(src: Any, *, tensor_parallel: int = 1, devices=None, tag: str | None = None,
         subtree: str | None = None) -> Loaded:
    """Weights, module and tokenizer of `src`; `tag` picks a checkpoint other than `latest`;
    `subtree` names the served model inside a live Engine's wrapper (RLHF's `policy`)."""
    from zerojax.engine import Engine

    if isinstance(src, Engine):
        return _from_engine(src, tensor_parallel, subtree)
    if isinstance(src, nnx.Module):
        return _from_module(src, inference_mesh(tensor_parallel, devices))
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} does not exist or is not a directory (expected a zerojax "
                                  f"checkpoint root or a Hugging Face model directory)")
        mesh = inference_mesh(tensor_parallel, devices)
        if os.path.exists(os.path.join(path, "config.json")):
            return _from_hf(path, mesh)
        return _from_checkpoint(path, mesh, tag)
    raise TypeError(f"cannot serve a {type(src).__name__}: pass a checkpoint root, a Hugging Face "
                    f"directory, a zerojax Engine or an nnx.Module")


def _finish(graphdef, params, rest, module, tokenizer, mesh, rules, shardings) -> Loaded:
    check_protocol(module)
    return Loaded(graphdef, params, rest, module, tokenizer, mesh, rules, shardings)


def _default_tokenizer(directory: str | None, vocab_size: int):
    found = tok.for_directory(directory) if directory else None
    if found is not None:
        return found
    return tok.ByteTokenizer() if vocab_size == 256 else None


def _from_checkpoint(root: str, mesh: Mesh, tag: str | None) -> Loaded:
    tag = checkpoint.resolve_tag(root, tag)
    meta = checkpoint.read_meta(root, tag)
    section, _ = checkpoint.model_section(meta)
    if not section or section.get("reward_head"):
        raise CheckpointError(f"checkpoint {os.path.join(root, tag)} has no language model section (it was "
                              f"not trained from a zerojax.models config, or it is a reward model), so it "
                              f"cannot be rebuilt for serving")
    abstract_module = nnx.eval_shape(lambda: models.build(section, nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract_module, nnx.Param, ...)
    abstract, rules, shardings = serving_layout(abstract_module, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored = checkpoint.restore_model_params(root, tag, meta, checkpoint.to_nested(target))
    params = checkpoint.from_nested(target, restored)
    vocab = abstract_module.kv_geometry().vocab_size if hasattr(abstract_module, "kv_geometry") else 0
    return _finish(graphdef, params, _concrete_rest(rest), abstract_module, _default_tokenizer(root, vocab),
                   mesh, rules, shardings)


def _from_hf(path: str, mesh: Mesh) -> Loaded:
    from zerojax import hf

    cfg = hf.load_config(path)
    model_cls = next(cls for cls, cfg_cls in models.MODELS.values() if isinstance(cfg, cfg_cls))
    abstract_module = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract_module, nnx.Param, ...)
    _, rules, shardings = serving_layout(abstract_module, mesh)
    params = hf.load_params(path, shardings=shardings, cfg=cfg)
    tokenizer = tok.for_directory(path)
    return _finish(graphdef, params, _concrete_rest(rest), abstract_module, tokenizer, mesh, rules, shardings)


def _from_module(module: nnx.Module, mesh: Mesh) -> Loaded:
    check_protocol(module)
    graphdef, params_state, rest = nnx.split(module, nnx.Param, ...)
    _, rules, shardings = serving_layout(module, mesh)
    params = reshard(nnx.to_pure_dict(params_state), shardings)
    vocab = module.kv_geometry().vocab_size
    return _finish(graphdef, params, nnx.to_pure_dict(rest), module, _default_tokenizer(None, vocab),
                   mesh, rules, shardings)


def _from_engine(engine, tensor_parallel: int, subtree: str | None = None) -> Loaded:
    """A live engine's current params; `subtree` serves a wrapped model (RLHF's `policy`)."""
    mesh = inference_mesh(tensor_parallel, list(engine.mesh.devices.flat))
    module = engine.model()
    params = engine.state.params
    if subtree is not None:
        module, params = getattr(module, subtree), params[subtree]
    check_protocol(module)
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)
    _, rules, shardings = serving_layout(module, mesh)
    params = reshard(params, shardings)
    rest = jax.device_put(nnx.to_pure_dict(rest), NamedSharding(mesh, P()))
    vocab = module.kv_geometry().vocab_size
    return _finish(graphdef, params, rest, module, _default_tokenizer(None, vocab), mesh, rules, shardings)


def reshard(params: Any, shardings: Any) -> Any:
    """Params moved to `shardings` device to device, never via numpy (a host array is put
    straight into its shards). On the same devices a compiled identity does it in one
    program; onto other devices (a training mesh bigger than the serving one) `device_put`
    copies shard to shard."""
    leaves = jax.tree.leaves(params)
    if not all(isinstance(x, jax.Array) for x in leaves):
        return jax.device_put(jax.tree.map(np.asarray, params), shardings)
    targets = {d for s in jax.tree.leaves(shardings) for d in s.device_set}
    if all(x.sharding.device_set == targets for x in leaves):
        flat, treedef = jax.tree.flatten(shardings)
        return _identity_into(treedef, tuple(flat))(params)
    return jax.device_put(params, shardings)


# Compiled once per layout, not per call: the hybrid engine reshards before every rollout.
@functools.lru_cache(maxsize=16)
def _identity_into(treedef, shardings: tuple):
    return jax.jit(lambda p: p, out_shardings=jax.tree.unflatten(treedef, list(shardings)))


@functools.lru_cache(maxsize=16)
def _cast_into(treedef, shardings: tuple, dtype):
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=jax.tree.unflatten(treedef, list(shardings)))


def _concrete_rest(rest) -> dict:
    """Non-param state of an abstract module (e.g. none for the reference models) as arrays."""
    def make(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jnp.zeros(x.shape, x.dtype)
        return x
    return jax.tree.map(make, nnx.to_pure_dict(rest))


def cast_params(params: Any, dtype: Any) -> Any:
    """Floating params in `dtype`, in their layout (serving weights, e.g. bf16)."""
    if dtype is None:
        return params
    flat, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, params))
    return _cast_into(treedef, tuple(flat), jnp.dtype(dtype))(params)


def stored_dtype(params: Any):
    floats = [x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return floats[0] if floats else jnp.float32


__all__ = ["Loaded", "PROTOCOL", "cast_params", "check_protocol", "inference_mesh", "load", "reshard", "serving_layout",
           "stored_dtype"]
