"""What every RLHF trainer does before and around its loop: check the `rlhf` section, find
the model's tokenizer and vocabulary, size the global batch, report the data's cuts, and
hand the batches to `zerojax.trainer.train` (outputs, checkpoints, resume as `zerojax train`)."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

from zerojax.config import Config, ConfigError
from zerojax.rlhf.settings import settings as check_settings


@dataclasses.dataclass
class Run:
    config: Config
    algorithm: str
    settings: dict
    tokenizer: Any
    chat_render: Callable | None
    vocab_size: int
    global_rows: int            # train_batch_size: sequences (SFT) or pairs (reward, DPO)
    model_fn: Callable          # rngs -> the config's model (what a wrapper wraps)
    model_section: dict         # zerojax.model, init_from included
    pad_id: int = 0             # right padding, never counted: any id in the vocabulary does


def prepare(config: Any, algorithm: str) -> Run:
    from zerojax.inference import tokenizer as tok
    from zerojax.mesh import build_mesh, data_parallel_size
    from zerojax.serve.protocol import chat_renderer
    from zerojax.trainer import model_fn_from_config

    config = Config.load(config)
    found = check_settings(config.zerojax.rlhf, algorithm)
    if not found["data"]:
        raise ConfigError(f'no data: set "zerojax": {{"rlhf": {{"data": "file.jsonl"}}}} for {algorithm}')
    model_fn, section = model_fn_from_config(config)
    init_from = section.get("init_from")
    hf_dir = init_from if init_from and os.path.isfile(os.path.join(init_from, "config.json")) else None
    tokenizer = tok.for_directory_or_bytes(hf_dir)
    max_positions = section.get("max_position_embeddings")
    context, what = ((found["max_len"], f"max_len {found['max_len']}") if "max_len" in found else
                     (found["max_prompt_len"] + found["max_new_tokens"],
                      f"max_prompt_len + max_new_tokens = {found['max_prompt_len'] + found['max_new_tokens']}"))
    if max_positions and context > max_positions:
        raise ConfigError(f"zerojax.rlhf.{what} exceeds the model's max_position_embeddings {max_positions}")
    rows = config.resolve_batch(data_parallel_size(build_mesh(config))).train_batch_size
    return Run(config, algorithm, found, tokenizer, chat_renderer(hf_dir), int(section["vocab_size"]), rows,
               model_fn, section)


def preference_data(run: Run):
    """The run's preference pairs (prompt, chosen, rejected ids) and their data report."""
    from zerojax.rlhf import data as rdata

    s = run.settings
    pairs, report = rdata.preference_pairs(s["data"], run.tokenizer, max_prompt_len=s["max_prompt_len"],
                                           max_len=s["max_len"])
    check_vocab(pairs, run.vocab_size, s["data"])
    return pairs, report


def check_vocab(examples: list, vocab_size: int, path: str) -> None:
    top = max(max(ids) for example in examples for ids in example if ids)
    if top >= vocab_size:
        raise ConfigError(f"{path}: token id {top} is outside the model's vocabulary of {vocab_size} (does the "
                          f"tokenizer match the model?)")


def warn_cuts(run: Run, report) -> None:
    """The data report's one warning line (cuts and drops), if anything was cut or dropped."""
    warning = report.summary()
    if warning:
        print(f"zerojax rlhf {run.algorithm}: warning: {warning}", file=sys.stderr, flush=True)


def train(run: Run, batches, report, *, model_fn=None, steps=None, out=None, stream=None,
          init_weights=None) -> dict:
    from zerojax.trainer import train as train_loop

    warn_cuts(run, report)
    summary = train_loop(model_fn, run.config, data=batches, steps=steps, out=out, stream=stream,
                         init_weights=init_weights)
    summary["data"] = dataclasses.asdict(report)
    return summary


def policy_model_section(policy) -> dict | None:
    """A wrapper's checkpoint `model` entry naming its `policy` subtree as the model, so the
    checkpoint is served, exported and `init_from`-ed as the policy (DPO, PPO, GRPO)."""
    cfg = getattr(policy, "cfg", None)
    if not dataclasses.is_dataclass(cfg):
        return None
    return {"type": type(policy).__name__.lower(), **dataclasses.asdict(cfg), "params_under": "policy"}
