"""Rollouts: completions sampled from the actor's live params by the serving engine.

DeepSpeed-Chat's Hybrid Engine switches the actor between its training layout and a
fast inference layout, because generation is most of RLHF's time. Here the actor's
`jax.Array` params (ZeRO-sharded, TP, any training layout) are handed to an
`InferenceEngine` before each rollout: `sync()` reshards them on device into the
serving layout (a compiled identity on the same devices, device-to-device copies onto a
smaller set), never through host numpy. The serving layout is Megatron TP over
`rollout_tensor_parallel` devices (default 1: on a CPU host one device decodes fastest,
and on a GPU a small policy gains nothing from splitting its matmuls); see
benchmarks/NOTES.md for both measured.

Sampling uses `temperature` and `top_p` with per-completion seeds drawn from the run's
seed, step and row, so a resumed run draws what the uninterrupted one would have. Each
token's log-prob is of the distribution it was drawn from before top-p truncation
(`logits / temperature`): what the trainer recomputes. A completion ends at EOS (kept as
its last token), a stop string (its text cut there) or `max_new_tokens`; nothing follows.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from zerojax.inference import InferenceEngine, SamplingParams, sources
from zerojax.inference.kv_cache import pages_for
from zerojax.rlhf import data as rdata

PAGE_SIZE = 16


@dataclasses.dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]          # generated ids, EOS included when it ended the completion
    logprobs: list[float]         # per generated token, at the rollout's temperature
    text: str                     # generated text, ended at EOS or cut at a stop string
    finish_reason: str            # "stop" (EOS or stop string) | "length"


class Rollout:
    def __init__(self, engine, *, tokenizer, max_prompt_len: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop: Sequence[str] = (), tensor_parallel: int = 1, max_seqs: int = 64,
                 subtree: str = "policy", seed: int = 0):
        self.engine, self.subtree, self.seed = engine, subtree, seed
        loaded = sources.load(engine, tensor_parallel=tensor_parallel, subtree=subtree)
        loaded = dataclasses.replace(loaded, tokenizer=tokenizer)
        context = max_prompt_len + max_new_tokens
        max_seqs = max(1, min(max_seqs, 64))
        # Few step shapes: a rollout decodes all its rows together, so the smallest bucket
        # holds them all (a batch thinned by EOS pads, which costs less than compiling), and
        # prompts prefill in chunks of a budget of 4 tokens a row (at least 64).
        self.inference = InferenceEngine(
            loaded, page_size=PAGE_SIZE, num_pages=max_seqs * pages_for(context, PAGE_SIZE) + 1,
            token_budget=max(64, max_seqs * 4), max_seqs=max_seqs, max_context=context,
            dtype=engine.compute_dtype, prefix_caching=True, max_logprobs=1, smallest_bucket=max_seqs)
        self.sampling = SamplingParams.create(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                              stop=list(stop), logprobs=0)

    @classmethod
    def for_run(cls, engine, run, rows: int) -> "Rollout":
        """The rollout of an online run's `rlhf` settings, `rows` sequences at a time."""
        s = run.settings
        return cls(engine, tokenizer=run.tokenizer, max_prompt_len=s["max_prompt_len"],
                   max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                   stop=s["stop"], tensor_parallel=s["rollout_tensor_parallel"], max_seqs=rows,
                   seed=run.config.zerojax.seed)

    def sync(self) -> None:
        """Serve the actor's current params (resharded on device; the prefix cache dropped)."""
        self.inference.set_params(self.engine.state.params[self.subtree])

    def generate(self, prompts: Sequence[list[int]], step: int) -> list[Completion]:
        """One completion per prompt (repeat a prompt for a group), seeded by (seed, step, row)."""
        engine = self.inference
        ids = []
        for row, prompt in enumerate(prompts):
            seed = int(np.random.SeedSequence([self.seed, step, row]).generate_state(1)[0] >> 1)
            ids.append(engine.add_request(list(prompt), dataclasses.replace(self.sampling, seed=seed)))
        while engine.has_unfinished():
            engine.step()
        out = []
        for prompt, request_id in zip(prompts, ids):
            done = engine.release(request_id)
            out.append(Completion(list(prompt), list(done.token_ids), [t.logprob for t in done.logprobs],
                                  done.text or "", done.finish_reason))
        return out


def completion_batch(completions: Sequence[Completion], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """`input_ids` [B, length] (prompt + completion, right-padded), `completion_mask` (1 on
    generated tokens) and `rollout_logps` [B, length] at the position that predicts each
    generated token (HF shift, as `losses.token_logps`)."""
    B = len(completions)
    ids = np.full((B, length), pad_id, np.int32)
    mask = np.zeros((B, length), np.int32)
    logps = np.zeros((B, length), np.float32)
    for row, c in enumerate(completions):
        p, n = len(c.prompt_ids), len(c.token_ids)
        ids[row, :p + n] = c.prompt_ids + c.token_ids
        mask[row, p:p + n] = 1
        logps[row, p - 1:p + n - 1] = c.logprobs
    return {"input_ids": ids, "completion_mask": mask, "rollout_logps": logps}


def padded_length(completions: Sequence[Completion], limit: int) -> int:
    """The batch length: the longest prompt + completion rounded as every RLHF batch is."""
    return rdata.padded_length(max(len(c.prompt_ids) + len(c.token_ids) for c in completions), limit)


__all__ = ["Completion", "Rollout", "completion_batch", "padded_length"]
