"""`zerojax train --deepspeed`: a pure DeepSpeed JSON and a HF model directory, run as HF's Trainer would.

DeepSpeed `"auto"` config values are filled from training arguments as the Trainer fills them.

A DeepSpeed JSON written for `transformers.Trainer --deepspeed ds_config.json` leaves
values to the Trainer with `"auto"`: batch sizes, optimizer hyperparameters, scheduler
steps, precision and ZeRO bucket sizes. `zerojax train --deepspeed` takes the Trainer's
argument names and defaults and fills the same keys the same way
(`transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig`):

    train_micro_batch_size_per_gpu   per_device_train_batch_size (8)
    gradient_accumulation_steps      gradient_accumulation_steps (1)
    train_batch_size                 world size x the two above
    gradient_clipping                max_grad_norm (1.0)
    optimizer.params.lr / betas / eps / weight_decay
                                     learning_rate (5e-5) / [adam_beta1, adam_beta2] / adam_epsilon / weight_decay
    scheduler.params.warmup_min_lr   0;  warmup_max_lr: learning_rate
    scheduler.params.warmup_num_steps  warmup_steps, else ceil(warmup_ratio x total steps)
    scheduler.params.total_num_steps   the run's steps
    fp16.enabled / bf16.enabled      fp16 / bf16 (false)
    zero_optimization.reduce_bucket_size, stage3_prefetch_bucket_size,
      stage3_param_persistence_threshold   hidden², 0.9 hidden², 10 hidden

Unlike the Trainer, a value the JSON sets differently from an argument is only an error
when that argument was given explicitly (a default does not contradict the JSON). An
`"auto"` left anywhere else has nothing to come from: a ConfigError names it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from zerojax.config import ConfigError, read_json

AUTO = "auto"


@dataclasses.dataclass
class TrainerArguments:
    """The HF `TrainingArguments` fields that fill DeepSpeed's "auto" values (their defaults)."""

    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    fp16: bool = False
    bf16: bool = False
    explicit: frozenset = frozenset()       # the fields the user set (the others are defaults)


def _get(tree: dict, dotted: str) -> tuple[dict | None, str]:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None, leaf
    return node, leaf


def resolve(raw: dict, args: TrainerArguments, *, world_size: int, steps: int | None,
            hidden_size: int | None) -> tuple[dict, list[str]]:
    """The config with every "auto" filled; plus one line per value filled, saying from what."""
    out = copy.deepcopy(raw)
    lines: list[str] = []
    mismatches: list[str] = []

    def fill(dotted: str, value: Any, source: str, check: str | None = None) -> None:
        """Fill `dotted` when it is "auto"; when set, compare it to an explicit argument."""
        node, leaf = _get(out, dotted)
        if node is None or leaf not in node:
            return
        if node[leaf] == AUTO:
            if value is None:
                raise ConfigError(f'{dotted}: "auto" needs {source}; pass it or set a number in the JSON')
            node[leaf] = value
            lines.append(f"auto: {dotted} = {value} ({source})")
        elif check is not None and check in args.explicit and node[leaf] != value:
            mismatches.append(f"{dotted} is {node[leaf]!r} in the JSON but {source} gives {value!r}")

    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    fill("train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size",
         "per_device_train_batch_size")
    fill("gradient_accumulation_steps", gas, "--gradient_accumulation_steps", "gradient_accumulation_steps")
    fill("train_batch_size", world_size * micro * gas,
         f"data-parallel size {world_size} x per_device_train_batch_size {micro} x "
         f"gradient_accumulation_steps {gas}")
    fill("gradient_clipping", args.max_grad_norm, "--max_grad_norm", "max_grad_norm")
    fill("optimizer.params.lr", args.learning_rate, "--learning_rate", "learning_rate")
    fill("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "--adam_beta1/--adam_beta2")
    fill("optimizer.params.eps", args.adam_epsilon, "--adam_epsilon", "adam_epsilon")
    fill("optimizer.params.weight_decay", args.weight_decay, "--weight_decay", "weight_decay")
    fill("scheduler.params.warmup_min_lr", 0, "the Trainer's 0")
    fill("scheduler.params.warmup_max_lr", args.learning_rate, "--learning_rate", "learning_rate")
    warmup = args.warmup_steps or (math.ceil(args.warmup_ratio * steps) if steps else None)
    fill("scheduler.params.warmup_num_steps", warmup if warmup is not None else 0,
         "--warmup_steps / --warmup_ratio", "warmup_steps")
    fill("scheduler.params.total_num_steps", steps, "--steps")
    fill("fp16.enabled", args.fp16, "--fp16", "fp16")
    fill("bf16.enabled", args.bf16, "--bf16", "bf16")
    hidden = (lambda f: int(f * hidden_size * hidden_size)) if hidden_size else (lambda f: None)
    fill("zero_optimization.reduce_bucket_size", hidden(1.0), "the model's hidden_size squared")
    fill("zero_optimization.stage3_prefetch_bucket_size", hidden(0.9), "0.9 x hidden_size squared")
    fill("zero_optimization.stage3_param_persistence_threshold",
         10 * hidden_size if hidden_size else None, "10 x the model's hidden_size")
    if mismatches:
        raise ConfigError("the DeepSpeed JSON and the arguments disagree: " + "; ".join(mismatches)
                          + ' (set the JSON value to "auto" or drop the argument)')
    left = _autos(out)
    if left:
        raise ConfigError(f'{left[0]}: "auto" has no value to come from (HF\'s Trainer fills batch '
                          f'sizes, optimizer and scheduler params, precision and ZeRO bucket sizes); '
                          f'set it in the JSON')
    return out, lines


def _autos(tree: Any, path: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _autos(v, f"{path}.{k}" if path else str(k))]
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in _autos(v, f"{path}[{i}]")]
    return [path] if tree == AUTO else []


# The JSONL fields that make a --data file a fine-tuning set rather than a text corpus.
_PAIRED = (("prompt", "response"), ("source", "target"), ("messages",))


def data_kind(path: str | None) -> str:
    """"pairs" for prompt/response, source/target or messages JSONL; "corpus" otherwise."""
    if not path or not path.endswith((".jsonl", ".json")) or not os.path.isfile(path):
        return "corpus"
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return "corpus"
                keys = set(record) if isinstance(record, dict) else set()
                return "pairs" if any(set(k) <= keys for k in _PAIRED) else "corpus"
    return "corpus"


def run_config(ds_config: str, model_dir: str, args: TrainerArguments, *, data: str | None,
               seq_len: int | None, steps: int | None, out: str | None, devices: int) -> tuple[dict, str, list[str]]:
    """(zerojax config dict, "corpus" | "pairs" | "seq2seq", the "auto" lines) for `zerojax train
    --deepspeed`: "pairs" fine-tune a decoder on the responses (SFT), "seq2seq" an encoder-decoder."""
    from zerojax import hf

    raw = read_json(Path(ds_config))
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ConfigError(f"--model {model_dir}: not a Hugging Face model directory (no config.json)")
    section = hf.model_section(model_dir)
    hidden = section.get("hidden_size") or section.get("n_embd") or section.get("d_model")
    stages = (raw.get("pipeline") or {}).get("stages", 1)
    parallel = (max(1, int((raw.get("tensor_parallel") or {}).get("autotp_size", 1) or 1))
                * int(raw.get("sequence_parallel_size", 1) or 1) * (stages if isinstance(stages, int) else 1))
    resolved, lines = resolve(raw, args, world_size=max(1, devices // parallel), steps=steps, hidden_size=hidden)
    kind = data_kind(data)
    max_len = seq_len or min(256, int(section.get("max_position_embeddings") or section.get("n_positions") or 256))
    zj = dict(resolved.get("zerojax") or {})
    zj["model"] = {**zj.get("model", {}), "init_from": model_dir}
    train = {**zj.get("train", {})}
    if steps:
        train["steps"] = steps
    if out:
        train["out"] = out
    zj["train"] = train
    if kind == "pairs" and section["type"] == "t5":
        kind = "seq2seq"                    # an encoder-decoder trains on the pairs directly
    if kind == "pairs":
        zj["rlhf"] = {**zj.get("rlhf", {}), "data": data, "max_len": max_len,
                      "max_prompt_len": max_len // 2}
    else:
        zj["data"] = {**zj.get("data", {}), "corpus": data or "stdlib", "seq_len": max_len}
    resolved["zerojax"] = zj
    return resolved, kind, lines
