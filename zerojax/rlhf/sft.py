"""Supervised fine-tuning (DeepSpeed-Chat step 1): next-token loss on response tokens only.

The batch is the model's own: `input_ids` and a `loss_mask` that is 1 on response tokens,
so the model's `__call__` (fused kernels, TP, ZeRO, pipelines: everything `zerojax train`
runs) computes `losses.sft_loss` — the mean NLL over the response tokens of the batch.
The result is a normal checkpoint: reward and DPO runs `init_from` it, and
`zerojax export --hf` exports it.
"""
from __future__ import annotations

from typing import Any

from zerojax.rlhf import common, data as rdata


def sft(config: Any, *, steps: int | None = None, out: str | None = None, stream=None) -> dict:
    """Fine-tune the config's model on `zerojax.rlhf.data` (prompt/response or messages)."""
    run = common.prepare(config, "sft")
    examples, report = rdata.sft_examples(run.settings["data"], run.tokenizer,
                                          max_prompt_len=run.settings["max_prompt_len"],
                                          max_len=run.settings["max_len"], chat_render=run.chat_render)
    common.check_vocab(examples, run.vocab_size, run.settings["data"])
    max_len, pad = run.settings["max_len"], run.pad_id

    def collate(rows):
        length = rdata.padded_length(max(len(p) + len(r) for p, r in rows), max_len)
        padded = rdata.pad_sequences([p for p, _ in rows], [r for _, r in rows], length, pad)
        return {"input_ids": padded["input_ids"], "loss_mask": padded["response_mask"]}

    batches = rdata.ExampleBatches(examples, run.global_rows, collate, seed=run.config.zerojax.seed)
    return common.train(run, batches, report, steps=steps, out=out, stream=stream)
