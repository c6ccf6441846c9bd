"""The reward model (DeepSpeed-Chat step 2): the base model plus a scalar score head,
trained on preference pairs with the Bradley-Terry loss `-log sigmoid(r_chosen - r_rejected)`.

A sequence's score is the head's value at its last non-pad token (DeepSpeed-Chat's
`chosen_end_scores`; what `LlamaForSequenceClassification` pools), so the checkpoint
exports to Hugging Face as `LlamaForSequenceClassification` / `GPT2ForSequenceClassification`
(`zerojax export --hf`) with `num_labels` 1 and the pad id 0 (padding never counts here).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zerojax.models import layers as L
from zerojax.rlhf import common, data as rdata, losses

SCORE_AXES = ("embed",)


class RewardModel(nnx.Module):
    def __init__(self, base: nnx.Module, *, rngs: nnx.Rngs):
        self.base = base
        cfg = base.cfg
        width = getattr(cfg, "hidden_size", None) or cfg.n_embd
        self.score = L.make_param(L.ParamSpec((width,), SCORE_AXES, L.normal(1.0 / (width + 1) ** 0.5)), rngs)
        self.zerojax_casts_per_layer = bool(getattr(base, "zerojax_casts_per_layer", False))

    @property
    def zerojax_model_section(self) -> dict:
        """The checkpoint's `model` entry: the base model's section, marked as scored."""
        return {"type": type(self.base).__name__.lower(), **dataclasses.asdict(self.base.cfg), "reward_head": True}

    def values(self, input_ids_BL: jax.Array) -> jax.Array:
        """[B, L] fp32: the score head at every position (PPO's critic reads them all)."""
        from zerojax import compute

        base = self.base
        h_BLD = base.final_hidden(base.run_layers(base.embed(input_ids_BL)))
        return jnp.einsum("bld,d->bl", h_BLD, compute.for_compute(self.score[...], SCORE_AXES),
                          preferred_element_type=jnp.float32)

    def scores(self, input_ids_BL: jax.Array, lengths_B: jax.Array) -> jax.Array:
        """[B] fp32: the score head at each sequence's last real token (`lengths - 1`)."""
        values_BL = self.values(input_ids_BL)
        # A masked sum, not a gather: a sequence-sharded length dimension reduces in place.
        last_BL = jnp.arange(input_ids_BL.shape[1])[None, :] == (lengths_B[:, None] - 1)
        return jnp.sum(jnp.where(last_BL, values_BL, 0.0), axis=1)

    def __call__(self, batch) -> tuple[jax.Array, dict]:
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
        lengths = jnp.concatenate([batch["chosen_lengths"], batch["rejected_lengths"]])
        s_B = self.scores(ids, lengths)
        B = batch["chosen_ids"].shape[0]
        return losses.pairwise_reward_loss(s_B[:B], s_B[B:])


def collate_scored_pairs(max_len: int, pad_id: int = 0):
    def collate(rows):
        chosen, rejected = rdata.pad_pairs(rows, max_len, pad_id)
        return {"chosen_ids": chosen["input_ids"], "chosen_lengths": chosen["lengths"],
                "rejected_ids": rejected["input_ids"], "rejected_lengths": rejected["lengths"]}
    return collate


def reward(config: Any, *, steps: int | None = None, out: str | None = None, stream=None) -> dict:
    """Train a reward model on `zerojax.rlhf.data` (prompt/chosen/rejected pairs)."""
    from zerojax.trainer import load_model_params

    run = common.prepare(config, "reward")
    s = run.settings
    pairs, report = common.preference_data(run)
    base_fn, section = run.model_fn, run.model_section

    def init_weights(engine):
        if section.get("init_from"):
            engine.set_params({**engine.state.params,
                               "base": load_model_params(engine, section["init_from"], "base")})

    batches = rdata.ExampleBatches(pairs, run.global_rows, collate_scored_pairs(s["max_len"], run.pad_id),
                                   seed=run.config.zerojax.seed)
    return common.train(run, batches, report, model_fn=lambda rngs: RewardModel(base_fn(rngs), rngs=rngs),
                        steps=steps, out=out, stream=stream, init_weights=init_weights)
