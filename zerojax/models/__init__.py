"""Reference models: Llama, GPT-2 and T5 in Flax NNX with logical axis names and stacked layers.

`build({"type": "llama", "hidden_size": 256, ...}, rngs)` makes a model from the
`"zerojax": {"model": ...}` config section (Hugging Face field names).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx

from zerojax.models.gpt2 import GPT2, GPT2Config
from zerojax.models.llama import Llama, LlamaConfig
from zerojax.models.t5 import T5, T5Config

__all__ = ["GPT2", "GPT2Config", "Llama", "LlamaConfig", "MODELS", "T5", "T5Config", "build", "make_config"]

MODELS: dict[str, tuple[type, type]] = {
    "llama": (Llama, LlamaConfig),
    "gpt2": (GPT2, GPT2Config),
    "t5": (T5, T5Config),
}


def make_config(model_section: Mapping[str, Any]) -> LlamaConfig | GPT2Config | T5Config:
    """The typed config for a `{"type": ..., **HF fields}` section (ValueError on a bad one)."""
    section = dict(model_section)
    kind = section.pop("type", None)
    if kind not in MODELS:
        raise ValueError(f"model type {kind!r} is not supported; expected one of {sorted(MODELS)}")
    config_cls = MODELS[kind][1]
    valid = [f.name for f in dataclasses.fields(config_cls)]
    if "init_from" in section:
        raise ValueError(
            "model field 'init_from' names weights to load; the caller loads them and must "
            "remove the key before building the model")
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown {kind} model field(s) {unknown}; valid fields: {', '.join(valid)}")
    return config_cls(**section)


def build(model_section: Mapping[str, Any], rngs: nnx.Rngs) -> nnx.Module:
    """Build the model a `{"type": "llama" | "gpt2" | "t5", **HF fields}` section describes."""
    cfg = make_config(model_section)
    model_cls = MODELS[model_section["type"]][0]
    return model_cls(cfg, rngs=rngs)
