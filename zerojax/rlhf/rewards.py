"""Rewards for online RLHF: Python functions (TRL's shape) or a trained reward model.

A reward function is `fn(prompts: list[str], completions: list[str], **columns) ->
list[float]`: the data's other JSONL fields arrive as keyword lists (for verifiable
rewards), completions exclude the prompt and end at EOS or a stop string. Several
functions combine as a weighted sum (`reward_weights`, default 1 each). A function that
raises, returns the wrong number of values, or a NaN / non-number is a `RewardError`
naming it: a silently wrong reward trains the wrong policy.

A reward model is a `zerojax rlhf reward` run's output directory: prompt + completion
ids are scored at the last token (DeepSpeed-Chat's `chosen_end_scores`), in one compiled
forward on the actor's devices.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from zerojax.config import ConfigError
from zerojax.rlhf import data as rdata


class RewardError(ConfigError):
    """A reward function or model that cannot score the completions as given."""


def load_function(spec: str) -> Callable:
    """The function named by `"path/to/file.py:name"`."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ConfigError(f'zerojax.rlhf.reward_fn {spec!r}: expected "path/to/file.py:function_name"')
    if not os.path.isfile(path):
        raise ConfigError(f"zerojax.rlhf.reward_fn {spec!r}: no such file {path}")
    module_name = "zerojax_reward_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise RewardError(f"zerojax.rlhf.reward_fn {spec!r}: importing {path} failed: "
                          f"{type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"zerojax.rlhf.reward_fn {spec!r}: {path} has no function {name!r}")
    return fn


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class RewardFunctions:
    """The weighted sum of one or more reward functions."""

    def __init__(self, fns: Sequence[Callable], weights: Sequence[float] | None = None):
        if not fns:
            raise ConfigError('no reward: set zerojax.rlhf.reward_fn ("file.py:name") or reward_model, '
                              "or pass reward_fn= to the Python API")
        self.fns = list(fns)
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.fns):
            raise ConfigError(f"{len(self.weights)} reward_weights for {len(self.fns)} reward functions")

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list],
                 **_: Any) -> tuple[np.ndarray, dict[str, float]]:
        """[B] rewards (raw: before any clipping or normalisation) and each function's mean."""
        total = np.zeros(len(completions), np.float64)
        means = {}
        for fn, weight in zip(self.fns, self.weights):
            values = self._call(fn, prompts, completions, columns)
            total += weight * values
            means[f"rewards/{_name(fn)}"] = float(values.mean())
        return total, means

    @staticmethod
    def _call(fn: Callable, prompts, completions, columns) -> np.ndarray:
        name = _name(fn)
        try:
            out = fn(prompts=list(prompts), completions=list(completions), **columns)
        except Exception as e:
            raise RewardError(f"reward function {name} raised {type(e).__name__}: {e}") from e
        try:
            values = np.asarray(list(out), dtype=np.float64)
        except (TypeError, ValueError):
            raise RewardError(f"reward function {name} must return a list of numbers, got "
                              f"{str(out)[:80]!r}") from None
        if values.shape != (len(completions),):
            raise RewardError(f"reward function {name} returned {values.size} values for "
                              f"{len(completions)} completions (one number per completion)")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RewardError(f"reward function {name} returned {values[bad[0]]} for completion {bad[0]} "
                              f"({completions[bad[0]][:40]!r}): rewards must be finite numbers")
        return values


class RewardModelScorer:
    """A trained reward model (a `zerojax rlhf reward` output) scoring prompt + completion ids."""

    def __init__(self, root: str, mesh, vocab_size: int, pad_id: int = 0):
        from zerojax import checkpoint, models
        from zerojax.errors import CheckpointError
        from zerojax.inference import sources
        from zerojax.rlhf.reward import RewardModel

        tag = checkpoint.resolve_tag(root, None)
        meta = checkpoint.read_meta(root, tag)
        section = dict(meta.get("model") or {})
        if not section.pop("reward_head", False):
            raise CheckpointError(f"zerojax.rlhf.reward_model {root}: checkpoint {tag} is not a reward model "
                                  f"(train one with `zerojax rlhf reward`)")
        section.pop("params_under", None)
        if int(section.get("vocab_size", -1)) != vocab_size:
            raise ConfigError(f"zerojax.rlhf.reward_model {root} has a vocabulary of {section.get('vocab_size')}, "
                              f"the policy {vocab_size}: they must share the tokenizer")
        abstract = nnx.eval_shape(lambda: RewardModel(models.build(section, nnx.Rngs(0)), rngs=nnx.Rngs(0)))
        graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
        abstract_params, rules, shardings = sources.serving_layout(abstract, mesh)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params, shardings)
        restored = checkpoint.restore_model_params(root, tag, meta, checkpoint.to_nested(target))
        self.params = checkpoint.from_nested(target, restored)
        self.rest = sources._concrete_rest(rest)
        self.pad_id = pad_id
        from zerojax import compute
        policy = compute.ComputePolicy(dtype=np.float32, mesh=mesh, rules=rules)

        def score(params, ids, lengths):
            with compute.use(policy):
                return nnx.merge(graphdef, params, self.rest).scores(ids, lengths)
        self._score = jax.jit(score)

    def __call__(self, sequences: Sequence[list[int]], length: int) -> np.ndarray:
        """[B] fp32 scores of token sequences (prompt + completion), padded to `length`."""
        ids = np.full((len(sequences), length), self.pad_id, np.int32)
        lengths = np.zeros(len(sequences), np.int32)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = seq
            lengths[row] = len(seq)
        return np.asarray(self._score(self.params, ids, lengths), np.float64)


def build(settings: dict, *, mesh, vocab_size: int, pad_id: int = 0, reward_fn=None) -> Callable:
    """`score(prompts, completions) -> ([B] raw rewards, metrics)` from the `rlhf` section's
    `reward_fn` / `reward_weights` / `reward_model`, or a callable (or list) passed in."""
    if reward_fn is not None:
        fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
        functions = RewardFunctions(fns, settings.get("reward_weights"))
    elif settings.get("reward_fn"):
        functions = RewardFunctions([load_function(spec) for spec in settings["reward_fn"]],
                                    settings.get("reward_weights"))
    elif settings.get("reward_model"):
        scorer = RewardModelScorer(settings["reward_model"], mesh, vocab_size, pad_id)
        limit = settings["max_prompt_len"] + settings["max_new_tokens"]

        def score_with_model(prompts, completions):
            sequences = [c.prompt_ids + c.token_ids for c in completions]
            length = rdata.padded_length(max(map(len, sequences)), limit)
            return scorer(sequences, length), {}
        return score_with_model
    else:
        raise ConfigError('no reward: set zerojax.rlhf.reward_fn ("file.py:name") or reward_model, '
                          "or pass reward_fn= to the Python API")

    def score_with_functions(prompts, completions):
        columns = {k: [p.columns[k] for p in prompts] for k in (prompts[0].columns if prompts else {})}
        return functions([p.text for p in prompts], [c.text for c in completions], columns)
    return score_with_functions
