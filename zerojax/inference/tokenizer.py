"""Tokenizers for serving: the byte tokenizer, a HF `tokenizer.json`, and incremental decoding.

The byte tokenizer (ids 0-255, zerojax's byte models) has no special tokens: no EOS, so
generation ends by `max_new_tokens`, the context, a stop string or `stop_token_ids`. A
Hugging Face directory's `tokenizer.json` is read with the `tokenizers` library; its EOS
ids come from `generation_config.json`, else `config.json`, else the tokenizer config's
`eos_token`, as transformers' `generate` finds them.
"""
from __future__ import annotations

import codecs
import json
import os
from typing import Sequence


class ByteTokenizer:
    vocab_size = 256
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> "ByteDetokenizer":
        return ByteDetokenizer()


class ByteDetokenizer:
    """Bytes in, complete UTF-8 characters out; a split character waits for its last byte."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Sequence[int]) -> str:
        return self._decoder.decode(bytes(int(i) for i in ids))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (fast tokenizer) with the directory's EOS ids."""

    def __init__(self, directory: str):
        from tokenizers import Tokenizer

        self.directory = directory
        self._tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size()
        config = _read_json(directory, "tokenizer_config.json")
        self.chat_template = config.get("chat_template")
        self.name = os.path.basename(os.path.normpath(directory))
        self.eos_token_ids = self._eos_ids(config)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))

    def _eos_ids(self, tokenizer_config: dict) -> tuple[int, ...]:
        for name in ("generation_config.json", "config.json"):
            value = _read_json(self.directory, name).get("eos_token_id")
            if value is not None:
                return tuple(value) if isinstance(value, list) else (int(value),)
        text = _token_text(tokenizer_config.get("eos_token"))
        token = self._tok.token_to_id(text) if text else None
        return (token,) if token is not None else ()

    def encode(self, text: str) -> list[int]:
        # A prompt is sent as it is: no special tokens added (a chat template adds its own).
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def detokenizer(self) -> "TextDetokenizer":
        return TextDetokenizer(self)


class TextDetokenizer:
    """Incremental decoding for multi-byte tokenizers: decode all ids, emit what is new,
    holding back a trailing replacement character (a split UTF-8 sequence)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def feed(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))
        new, self.emitted = text[self.emitted:stable], max(self.emitted, stable)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def for_directory(directory: str):
    """The HF tokenizer of a directory that has `tokenizer.json`, else None."""
    return HFTokenizer(directory) if os.path.exists(os.path.join(directory, "tokenizer.json")) else None


def for_directory_or_bytes(directory: str | None):
    """What a training run tokenises its text with: the HF tokenizer of `directory` (a model
    directory) when it has one, else the byte tokenizer."""
    return (for_directory(directory) if directory else None) or ByteTokenizer()
