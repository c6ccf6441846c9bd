"""Token data: a byte tokenizer, corpora as flat token arrays, deterministic batches.

A corpus is one flat array of token ids (an ``np.memmap`` for token files, so nothing is
read until a batch needs it), named in the config's ``"zerojax": {"data": {...}}``::

    "stdlib"          the .py files of the running Python's standard library, as bytes
    "path/to/texts"   a UTF-8 text file, or a directory of them (binary files skipped)
    "tokens.bin"      nanoGPT-style token ids, uint16 (or ``"dtype": "uint32"``)
    "tokens.npy"      a 1-D integer array, memory-mapped

The last ``val_fraction`` of the array is validation. :class:`TokenBatches` draws the
windows of batch ``i`` from ``np.random.default_rng([seed, i])`` alone, so the global
batch sequence is the same whatever the process or device count; each process builds
only its contiguous share of the rows. Its ``state()`` goes into checkpoints.
"""
from __future__ import annotations

import difflib
import os
import sysconfig
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from zerojax.config import ConfigError

STDLIB_LIMIT = 8_000_000  # bytes of the stdlib corpus
DATA_KEYS = {"corpus": "stdlib", "seq_len": 256, "val_fraction": 0.01, "dtype": "uint16"}
TOKEN_DTYPES = ("uint8", "uint16", "uint32")
_CHUNK = 1 << 24  # elements per pass when scanning a memmap


class ByteTokenizer:
    """UTF-8 bytes as token ids: vocab 256, no special tokens."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        return bytes(np.asarray(ids, np.int64).astype(np.uint8).tolist()).decode("utf-8", errors="replace")


class Corpus(NamedTuple):
    tokens: np.ndarray  # 1-D, uint8/uint16/uint32 (or the .npy's integer dtype)
    vocab_size: int     # smallest vocab that holds every id (max id + 1; 256 for bytes)
    name: str


# ---- reading ---------------------------------------------------------------------------
def stdlib_tokens(limit: int = STDLIB_LIMIT) -> np.ndarray:
    """Bytes of the stdlib's .py files in sorted walk order (no tests, no site-packages)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "test", "tests", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    chunks.append(f.read())
                total += len(chunks[-1])
                if total >= limit:
                    return np.frombuffer(b"".join(chunks)[:limit], np.uint8)
    return np.frombuffer(b"".join(chunks), np.uint8)


def _text_bytes(path: str) -> bytes | None:
    """A file's bytes if it is UTF-8 text, else None."""
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def text_tokens(path: str) -> np.ndarray:
    """A text file, or every UTF-8 text file under a directory (sorted walk), as bytes."""
    if os.path.isfile(path):
        data = _text_bytes(path)
        if data is None:
            raise ConfigError(f"zerojax.data.corpus: {path} is not UTF-8 text "
                              f"(token files end in .bin or .npy)")
        return np.frombuffer(data, np.uint8)
    chunks = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if not name.startswith("."):
                data = _text_bytes(os.path.join(dirpath, name))
                if data:
                    chunks.append(data)
    return np.frombuffer(b"".join(chunks), np.uint8)


def token_file(path: str, dtype: str = "uint16") -> np.ndarray:
    """A nanoGPT-style ``.bin`` (raw ids of ``dtype``) or a 1-D integer ``.npy``, memory-mapped."""
    if path.endswith(".npy"):
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ConfigError(f"zerojax.data.corpus: {path} holds a {arr.dtype} array of shape "
                              f"{arr.shape}; a token file is a 1-D integer array")
        return arr
    if dtype not in TOKEN_DTYPES:
        raise ConfigError(f"zerojax.data.dtype: {dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    size, item = os.path.getsize(path), np.dtype(dtype).itemsize
    if size % item:
        raise ConfigError(f"zerojax.data.corpus: {path} has {size} bytes, not a multiple of "
                          f"{item} ({dtype}); is \"dtype\" right, or is the file truncated?")
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)


def _id_range(tokens: np.ndarray) -> tuple[int, int]:
    lo, hi = 0, -1
    for i in range(0, len(tokens), _CHUNK):
        chunk = np.asarray(tokens[i:i + _CHUNK])
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    return lo, hi


def read_corpus(corpus: str = "stdlib", *, dtype: str = "uint16") -> Corpus:
    """The corpus named by ``zerojax.data.corpus`` as one flat token array."""
    if corpus == "stdlib":
        tokens, name = stdlib_tokens(), "the stdlib corpus"
    else:
        path = os.path.abspath(os.path.expanduser(corpus))
        if not os.path.exists(path):
            raise ConfigError(f"zerojax.data.corpus: {corpus} does not exist (from {os.getcwd()}); "
                              f"give a text file, a directory of text, a .bin/.npy token file, "
                              f"or \"stdlib\"")
        name = corpus
        if os.path.isfile(path) and path.endswith((".bin", ".npy")):
            tokens = token_file(path, dtype)
        else:
            tokens = text_tokens(path)
    if len(tokens) == 0:
        raise ConfigError(f"zerojax.data.corpus: {name} is empty (no text found, zero tokens)")
    if tokens.dtype == np.uint8:
        return Corpus(tokens, 256, name)
    lo, hi = _id_range(tokens)
    if lo < 0:
        raise ConfigError(f"zerojax.data.corpus: {name} holds a negative token id {lo}")
    return Corpus(tokens, hi + 1, name)


def load_corpus(data_section: Mapping[str, Any] | None, *, vocab_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``zerojax.data`` -> ``(train_tokens, val_tokens)``: the last ``val_fraction`` is val.

    ``val_fraction`` 0 gives an empty validation array; otherwise both parts must hold at
    least ``seq_len + 1`` tokens.
    """
    section = dict(data_section or {})
    for key in section:
        if key not in DATA_KEYS:
            near = difflib.get_close_matches(key, DATA_KEYS, n=1)
            raise ConfigError(f"zerojax.data.{key}: unknown key"
                              + (f"; did you mean {near[0]!r}?" if near else
                                 f" (known: {', '.join(DATA_KEYS)})"))
    cfg = {**DATA_KEYS, **section}
    corpus, seq_len, frac, dtype = cfg["corpus"], cfg["seq_len"], cfg["val_fraction"], cfg["dtype"]
    if not isinstance(corpus, str) or not corpus:
        raise ConfigError(f"zerojax.data.corpus: expected a path or \"stdlib\", got {corpus!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"zerojax.data.seq_len: expected a positive integer, got {seq_len!r}")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise ConfigError(f"zerojax.data.val_fraction: expected a number in [0, 1), got {frac!r}")

    data = read_corpus(corpus, dtype=dtype)
    tokens, n = data.tokens, len(data.tokens)
    if data.vocab_size > vocab_size:
        what = ("is byte-tokenized (ids 0..255)" if tokens.dtype == np.uint8
                else f"holds token id {data.vocab_size - 1}")
        raise ConfigError(f"zerojax.data.corpus: {data.name} {what} but the model's vocab_size "
                          f"is {vocab_size}; set the model's vocab_size to at least {data.vocab_size}")
    if n < seq_len + 1:
        raise ConfigError(f"zerojax.data.corpus: {data.name} has {n} tokens, fewer than "
                          f"seq_len + 1 = {seq_len + 1}; add text or lower zerojax.data.seq_len")
    n_val = int(n * frac)
    if frac and (n_val < seq_len + 1 or n - n_val < seq_len + 1):
        raise ConfigError(f"zerojax.data.val_fraction: {frac} of {n} tokens gives "
                          f"{n - n_val} train / {n_val} validation tokens; each needs at least "
                          f"seq_len + 1 = {seq_len + 1} (change val_fraction, or add text)")
    return tokens[:n - n_val], tokens[n - n_val:]


# ---- batches ---------------------------------------------------------------------------
class ResumableBatches:
    """The position of a deterministic batch sequence: `next()` yields `batch(index)` and
    moves on; `state()` / `restore()` carry the position through a checkpoint. A subclass
    sets `self.seed`, `self.index = 0` and defines `batch(index)`."""

    seed: int
    index: int

    def batch(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @staticmethod
    def processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
        """This process's index and the process count (jax's where not given)."""
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        return process_index, process_count

    def next(self) -> dict[str, np.ndarray]:
        out = self.batch(self.index)
        self.index += 1
        return out

    __next__ = next

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def state(self) -> dict[str, int]:
        """JSON-serialisable position, for a checkpoint's ``client_state``."""
        return {"index": self.index, "seed": self.seed}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (its seed wins: a resumed run keeps its sequence)."""
        index, seed = (state.get(k) if isinstance(state, Mapping) else None for k in ("index", "seed"))
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (index, seed)):
            raise ValueError(f"not a {type(self).__name__} state: {state!r}")
        self.index, self.seed = index, seed


class TokenBatches(ResumableBatches):
    """Deterministic, resumable batches ``{"input_ids": int32 [rows, seq_len]}``.

    Batch ``i`` holds ``global_rows`` windows at offsets drawn from
    ``np.random.default_rng([seed, i])``; this process materialises rows
    ``[process_index * rows, (process_index + 1) * rows)`` with
    ``rows = global_rows / process_count``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_rows: int, *, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None):
        process_index, process_count = self.processes(process_index, process_count)
        if len(tokens) < seq_len + 1:
            raise ConfigError(f"zerojax.data.seq_len: {len(tokens)} tokens are fewer than "
                              f"seq_len + 1 = {seq_len + 1}")
        if global_rows < 1 or global_rows % process_count:
            raise ConfigError(f"batch of {global_rows} rows cannot be split evenly over "
                              f"{process_count} processes; make train_batch_size a multiple "
                              f"of {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
        self.tokens, self.seq_len, self.global_rows = tokens, seq_len, global_rows
        self.rows = global_rows // process_count
        self.first_row = process_index * self.rows
        self.seed, self.index = seed, 0
        self._window = np.arange(seq_len)

    def offsets(self, index: int) -> np.ndarray:
        """Start offsets of all ``global_rows`` windows of batch ``index``."""
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, len(self.tokens) - self.seq_len + 1, size=self.global_rows)

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """This process's rows of batch ``index`` (does not move the position)."""
        starts = self.offsets(index)[self.first_row:self.first_row + self.rows]
        return {"input_ids": np.asarray(self.tokens[starts[:, None] + self._window], np.int32)}

