"""Seq2seq data for encoder-decoder models (T5): `{"source", "target"}` JSONL -> padded batches.

Each line is one JSON object `{"source": str, "target": str}` (blank lines skipped; a
malformed line is a `DataError` naming the file and line). Both sides are tokenised (the
byte tokenizer or a Hugging Face `tokenizer.json`, see `zerojax.inference.tokenizer`) and
get the tokenizer's EOS appended when it has one, as T5's tokenizer does; a side longer
than its maximum is cut to it, its EOS kept.

Batches have fixed shapes (one compiled step): `input_ids` and `attention_mask` [B,
max_source_len], right-padded with `pad_id`, and `labels` [B, max_target_len] with -100
on padding, what `zerojax.models.T5` takes. Batch i draws its rows with
`np.random.default_rng([seed, i])`, so any number of steps runs and a run resumes where
it stopped (`state()` / `restore()`, as `zerojax.data.TokenBatches`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from zerojax.data import ResumableBatches
from zerojax.models.layers import IGNORE_INDEX
from zerojax.rlhf.data import DataError, read_jsonl

Example = tuple[list[int], list[int]]


def encode_pair(source: str, target: str, tokenizer, *, max_source_len: int, max_target_len: int) -> Example:
    """(source ids, target ids), each with the tokenizer's EOS (if any) and cut to its maximum."""
    eos = list(getattr(tokenizer, "eos_token_ids", ())[:1])

    def side(text: str, limit: int) -> list[int]:
        ids = list(tokenizer.encode(text))[:limit - len(eos)] + eos
        return ids[:limit]

    return side(source, max_source_len), side(target, max_target_len)


def read_examples(path: str, tokenizer, *, max_source_len: int, max_target_len: int) -> list[Example]:
    """Every line of a `{"source", "target"}` JSONL file, tokenised and cut (see the module)."""
    for name, value in (("max_source_len", max_source_len), ("max_target_len", max_target_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive int, got {value!r}")
    out = []
    for number, record in read_jsonl(path):
        texts = []
        for key in ("source", "target"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{path}:{number}: expected a string {key!r} (a seq2seq line is "
                                f'{{"source": str, "target": str}}), got keys {sorted(record)}')
            texts.append(record[key])
        out.append(encode_pair(*texts, tokenizer, max_source_len=max_source_len, max_target_len=max_target_len))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def pad_batch(examples: Sequence[Example], *, max_source_len: int, max_target_len: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
    """`input_ids`, `attention_mask` [B, max_source_len] and `labels` [B, max_target_len]
    (-100 past each target) for already-cut examples."""
    rows = len(examples)
    input_ids = np.full((rows, max_source_len), pad_id, np.int32)
    attention_mask = np.zeros((rows, max_source_len), np.int32)
    labels = np.full((rows, max_target_len), IGNORE_INDEX, np.int32)
    for row, (source, target) in enumerate(examples):
        if len(source) > max_source_len or len(target) > max_target_len:
            raise ValueError(f"example {row} is longer than the maxima ({len(source)}, {len(target)} tokens)")
        input_ids[row, :len(source)] = source
        attention_mask[row, :len(source)] = 1
        labels[row, :len(target)] = target
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Seq2SeqBatches(ResumableBatches):
    """Deterministic, resumable fixed-shape seq2seq batches of `global_rows` examples; this
    process materialises its `global_rows / process_count` of them."""

    def __init__(self, examples: Sequence[Example], global_rows: int, *, max_source_len: int,
                 max_target_len: int, pad_id: int = 0, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        process_index, process_count = self.processes(process_index, process_count)
        if not examples:
            raise DataError("no seq2seq examples")
        if global_rows < 1 or global_rows % process_count:
            raise DataError(f"batch of {global_rows} rows cannot be split evenly over {process_count} processes")
        self.examples, self.global_rows, self.pad_id = list(examples), global_rows, pad_id
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        self.rows = global_rows // process_count
        self.first_row = process_index * self.rows
        self.seed, self.index = seed, 0

    def batch(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, index])
        picks = rng.choice(len(self.examples), self.global_rows, replace=len(self.examples) < self.global_rows)
        mine = picks[self.first_row:self.first_row + self.rows]
        return pad_batch([self.examples[i] for i in mine], max_source_len=self.max_source_len,
                         max_target_len=self.max_target_len, pad_id=self.pad_id)


def batches_from_file(path: str, tokenizer, global_rows: int, *, max_source_len: int, max_target_len: int,
                      pad_id: int = 0, seed: int = 0) -> Seq2SeqBatches:
    """`read_examples` then `Seq2SeqBatches` in one call."""
    examples = read_examples(path, tokenizer, max_source_len=max_source_len, max_target_len=max_target_len)
    return Seq2SeqBatches(examples, global_rows, max_source_len=max_source_len,
                          max_target_len=max_target_len, pad_id=pad_id, seed=seed)
