"""RLHF data: JSONL examples in, tokenised and truncated, deterministic padded batches out.

Files hold one JSON object a line (blank lines skipped):
  SFT          {"prompt": str, "response": str}  or  {"source": str, "target": str}
               or  {"messages": [{"role", "content"}, ...]}
               (messages: the last one is the assistant's response, the rest render as the
               prompt through the chat template, generation prompt included)
  preferences  {"prompt": str, "chosen": str, "rejected": str}

A malformed line is a `DataError` naming the file and line. Responses get the tokenizer's
EOS appended when it has one (the byte tokenizer has none). A prompt over `max_prompt_len`
tokens keeps its last `max_prompt_len`; a response is cut to fit `max_len`; an example
left without response tokens is dropped, and a pair whose chosen equals its rejected is
dropped: `Report` counts each, and `Report.summary()` is the one warning line.

Batches are right-padded with `pad_id` to their longest sequence rounded up to 32 tokens
(at most `max_len`: a few compiled shapes, not one per batch); `response_mask` is 1 on
response tokens. Batch i is a slice of the examples in the order
of `np.random.default_rng([seed, epoch])`; past the last example the next epoch
reshuffles, so any number of steps runs. Resumable like `zerojax.data.TokenBatches`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import numpy as np

from zerojax.config import ConfigError
from zerojax.data import ResumableBatches


class DataError(ConfigError):
    """A data file that cannot be used as given (exit code 2 from the CLI)."""


@dataclasses.dataclass
class Report:
    examples: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    dropped_empty: int = 0
    dropped_identical: int = 0

    def summary(self) -> str | None:
        """One warning line when anything was cut or dropped, else None."""
        parts = [f"{n} {what}" for n, what in ((self.prompts_cut, "prompts cut from the left to max_prompt_len"),
                                                (self.responses_cut, "responses cut to max_len"),
                                                (self.dropped_empty, "examples dropped with no response left"),
                                                (self.dropped_identical, "pairs dropped whose chosen equals rejected"))
                 if n]
        return f"rlhf data: {self.examples} examples kept; " + ", ".join(parts) if parts else None


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file (set zerojax.rlhf.data to a JSONL file)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no examples (one JSON object per line)")
    return records


def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (has {', '.join(sorted(record)) or 'nothing'})")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]


def _messages(record: dict, where: str, render: Callable[[list[dict]], str]) -> tuple[str, str]:
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: 'messages' must be a list of at least two messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message is the response and must have role 'assistant', "
                        f"got {messages[-1]['role']!r}")
    return render(messages[:-1]), messages[-1]["content"]


class _Encoder:
    def __init__(self, tokenizer, max_prompt_len: int, max_len: int, report: Report):
        self.tokenizer, self.max_prompt_len, self.max_len, self.report = tokenizer, max_prompt_len, max_len, report
        self.eos = list(getattr(tokenizer, "eos_token_ids", ())[:1])

    def prompt(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text))
        if len(ids) > self.max_prompt_len:
            self.report.prompts_cut += 1
            ids = ids[-self.max_prompt_len:]
        return ids

    def response(self, prompt_ids: list[int], text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text)) + self.eos
        room = self.max_len - len(prompt_ids)
        if len(ids) > room:
            self.report.responses_cut += 1
            ids = ids[:room]
        return ids


def sft_examples(path: str, tokenizer, *, max_prompt_len: int, max_len: int,
                 chat_render: Callable[[list[dict]], str] | None = None) -> tuple[list[tuple[list, list]], Report]:
    """(prompt ids, response ids) per usable line of an SFT file."""
    from zerojax.serve.protocol import plain_chat

    report = Report()
    encode = _Encoder(tokenizer, max_prompt_len, max_len, report)
    out = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if "messages" in record:
            prompt, response = _messages(record, where, chat_render or plain_chat)
        elif "source" in record and "prompt" not in record:     # seq2seq-style pairs
            prompt, response = _text(record, "source", where), _text(record, "target", where)
        else:
            prompt, response = _text(record, "prompt", where), _text(record, "response", where)
        prompt_ids = encode.prompt(prompt)
        response_ids = encode.response(prompt_ids, response)
        if not response_ids:
            report.dropped_empty += 1
            continue
        out.append((prompt_ids, response_ids))
    report.examples = len(out)
    _check_some(out, path, report)
    return out, report


def preference_pairs(path: str, tokenizer, *, max_prompt_len: int, max_len: int
                     ) -> tuple[list[tuple[list, list, list]], Report]:
    """(prompt ids, chosen ids, rejected ids) per usable line of a preference file."""
    report = Report()
    encode = _Encoder(tokenizer, max_prompt_len, max_len, report)
    out = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        prompt, chosen, rejected = (_text(record, k, where) for k in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            report.dropped_identical += 1
            continue
        prompt_ids = encode.prompt(prompt)
        chosen_ids, rejected_ids = encode.response(prompt_ids, chosen), encode.response(prompt_ids, rejected)
        if not chosen_ids or not rejected_ids:
            report.dropped_empty += 1
            continue
        out.append((prompt_ids, chosen_ids, rejected_ids))
    report.examples = len(out)
    _check_some(out, path, report)
    return out, report


def _check_some(examples: list, path: str, report: Report) -> None:
    if not examples:
        raise DataError(f"{path}: no usable examples left ({report.summary()}); raise max_len or shorten prompts")


PAD_MULTIPLE = 32


def padded_length(longest: int, max_len: int, multiple: int = PAD_MULTIPLE) -> int:
    """A batch's length: its longest sequence rounded up to `multiple`, at most `max_len`.
    A few shapes (so few compiles) instead of always `max_len`: short data runs short steps."""
    return min(max_len, -(-longest // multiple) * multiple)


def pad_sequences(prompts: Sequence[list[int]], responses: Sequence[list[int]], max_len: int,
                  pad_id: int = 0) -> dict[str, np.ndarray]:
    """`input_ids`, `response_mask` [B, max_len] (right-padded) and `lengths` [B]."""
    ids = np.full((len(prompts), max_len), pad_id, np.int32)
    mask = np.zeros((len(prompts), max_len), np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[row, :n] = p + r
        mask[row, len(p):n] = 1
        lengths[row] = n
    return {"input_ids": ids, "response_mask": mask, "lengths": lengths}


def pad_pairs(rows: Sequence[tuple[list, list, list]], max_len: int, pad_id: int = 0) -> tuple[dict, dict]:
    """`pad_sequences` of (prompt + chosen) and (prompt + rejected), padded to one length."""
    length = padded_length(max(len(p) + max(len(c), len(r)) for p, c, r in rows), max_len)
    prompts = [p for p, _, _ in rows]
    return (pad_sequences(prompts, [c for _, c, _ in rows], length, pad_id),
            pad_sequences(prompts, [r for _, _, r in rows], length, pad_id))


class ExampleBatches(ResumableBatches):
    """Deterministic, resumable batches of `global_rows` examples, epoch after epoch.

    `collate(examples) -> dict of arrays` builds a batch (SFT rows or preference pairs).
    This process materialises its slice of the global batch, as `TokenBatches` does.
    """

    def __init__(self, examples: list, global_rows: int, collate: Callable[[list], dict], *, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        process_index, process_count = self.processes(process_index, process_count)
        if global_rows < 1 or global_rows % process_count:
            raise ConfigError(f"batch of {global_rows} rows cannot be split evenly over {process_count} processes")
        self.examples, self.global_rows, self.collate, self.seed = examples, global_rows, collate, seed
        self.rows, self.first_row = global_rows // process_count, process_index * (global_rows // process_count)
        self.index = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def indices(self, index: int) -> list[int]:
        """Example indices of all `global_rows` rows of batch `index` (epochs concatenated)."""
        n, out = len(self.examples), []
        start = index * self.global_rows
        while len(out) < self.global_rows:
            epoch, offset = divmod(start + len(out), n)
            out.extend(self._order(epoch)[offset:offset + self.global_rows - len(out)].tolist())
        return out

    def batch(self, index: int) -> dict[str, np.ndarray]:
        chosen = self.indices(index)[self.first_row:self.first_row + self.rows]
        return self.collate([self.examples[i] for i in chosen])
