"""Streamed safetensors I/O: write one tensor at a time, read only the slice a device needs.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length N, N bytes of JSON (`{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`, padded with spaces to a multiple of 8), then the raw
little-endian tensor bytes, contiguous, in header order. The header depends only on
names, shapes and dtypes, so a writer can emit it first and then fetch and write the
tensors one by one: peak host memory stays near the largest tensor.

Hugging Face sharding: `model-00001-of-0000N.safetensors` files plus
`model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map": {name: file}}`),
or a single `model.safetensors` when everything fits in one shard.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from zerojax.errors import CheckpointError

BF16 = np.dtype(ml_dtypes.bfloat16)

# safetensors dtype code <-> numpy dtype
_CODES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": BF16, "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODE_OF: dict[np.dtype, str] = {dtype: code for code, dtype in _CODES.items()}

SINGLE_FILE = "{prefix}.safetensors"
INDEX_FILE = "{prefix}.safetensors.index.json"
SHARD_FILE = "{prefix}-{index:05d}-of-{count:05d}.safetensors"

TensorEntry = tuple[str, Sequence[int], Any]           # (name, shape, dtype)


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a numpy-compatible dtype ("F32", "BF16", ...)."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        raise ValueError(f"dtype {dt} has no safetensors code; supported: {sorted(_CODES)}")
    return _CODE_OF[dt]


def _normalise(tensors: Iterable[TensorEntry]) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    entries, seen = [], set()
    for name, shape, dtype in tensors:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if name in seen:
            raise ValueError(f"tensor {name!r} is listed twice")
        seen.add(name)
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"tensor {name!r} has a negative dimension in {shape}")
        dt = np.dtype(dtype)
        dtype_code(dt)
        entries.append((name, shape, dt))
    return sorted(entries, key=lambda e: e[0])


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def write_safetensors(path: str, tensors: Iterable[TensorEntry],
                      fetch: Callable[[str], np.ndarray], *,
                      metadata: Mapping[str, str] | None = None) -> str:
    """Write one safetensors file, calling `fetch(name)` for one tensor at a time.

    `tensors` lists (name, shape, dtype) up front; what `fetch` returns must have that
    shape (it is cast to that dtype). Written to `path + ".tmp"`, then renamed: a reader
    never sees a partial file under `path`.
    """
    entries = _normalise(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dt in entries:
        size = _nbytes(shape, dt)
        header[name] = {"dtype": dtype_code(dt), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for name, shape, dt in entries:
                array = np.asarray(fetch(name))
                if array.shape != shape:
                    raise ValueError(f"fetch({name!r}) returned shape {array.shape}, expected {shape}")
                array = np.ascontiguousarray(array, dtype=dt.newbyteorder("<"))
                f.write(array.reshape(-1).view(np.uint8).data)
                del array
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def plan_shards(tensors: Iterable[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Group tensors (in name order) into shards of at most `max_shard_bytes` each.

    A tensor larger than the limit gets a shard of its own, as in Hugging Face.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[TensorEntry]] = [[]]
    used = 0
    for entry in _normalise(tensors):
        size = _nbytes(entry[1], entry[2])
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_sharded(directory: str, tensors: Iterable[TensorEntry],
                  fetch: Callable[[str], np.ndarray], *, max_shard_bytes: int,
                  prefix: str = "model", metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write tensors as Hugging Face shards (+ index), or one `{prefix}.safetensors` if they fit.

    Returns the file names written. The index is written last, and files of an earlier
    save under the same prefix that this one does not use are removed afterwards, so
    the directory never mixes two saves for a loader.
    """
    os.makedirs(directory, exist_ok=True)
    entries = _normalise(tensors)
    shards = plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE.format(prefix=prefix)]
    else:
        names = [SHARD_FILE.format(prefix=prefix, index=i + 1, count=len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(os.path.join(directory, name), shard, fetch, metadata=metadata)
    written = list(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(s, d) for _, s, d in entries)},
                 "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard}}
        index_name = INDEX_FILE.format(prefix=prefix)
        _write_json(os.path.join(directory, index_name), index)
        written.append(index_name)
    stale = re.compile(rf"^{re.escape(prefix)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?$")
    for existing in os.listdir(directory):
        if stale.match(existing) and existing not in written:
            os.remove(os.path.join(directory, existing))
    return written


# ----------------------------------------------------------------------------- reading

class Reader:
    """Tensors of one safetensors file or a sharded index, read whole or by slice."""

    def __init__(self, files: Mapping[str, str], where: str):
        self._file_of = dict(files)            # tensor name -> file path
        self._where = where
        self._handles: dict[str, Any] = {}

    def _open(self, path: str):
        if path not in self._handles:
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: file is missing (listed by {self._where})")
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as e:  # SafetensorError: bad header, truncated data
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated "
                                      f"or corrupt") from None
        return self._handles[path]

    def _slice(self, name: str):
        path = self.file_of(name)
        try:
            return self._open(path).get_slice(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> str:
        if name not in self._file_of:
            raise CheckpointError(f"{self._where}: has no tensor {name!r}")
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        code = self._slice(name).get_dtype()
        if code not in _CODES:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has unsupported dtype {code}")
        return _CODES[code]

    def read(self, name: str, index: Any = None) -> np.ndarray:
        """The tensor, or `tensor[index]` (a tuple of slices) read without loading the rest."""
        sl = self._slice(name)
        try:
            if index is None:
                return self._open(self.file_of(name)).get_tensor(name)
            return np.asarray(sl[index])
        except Exception as e:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r}"
                                  f"{'' if index is None else f' at {index}'} ({e})") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _names_in_file(path: str) -> list[str]:
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated "
                              f"or corrupt") from None


def open_checkpoint_dir(path: str, prefix: str = "model") -> Reader:
    """A Reader for `{prefix}.safetensors.index.json` or `{prefix}.safetensors` in a directory.

    `path` may also name a `.safetensors` file or an index file directly.
    """
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_FILE.format(prefix=prefix))
        single = os.path.join(path, SINGLE_FILE.format(prefix=prefix))
        if os.path.isfile(index):
            path = index
        elif os.path.isfile(single):
            path = single
        else:
            raise CheckpointError(f"{path}: has neither {os.path.basename(single)} nor "
                                  f"{os.path.basename(index)}")
    elif not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")

    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        base = os.path.dirname(path)
        reader = Reader({name: os.path.join(base, file) for name, file in weight_map.items()}, path)
        for file in sorted(set(weight_map.values())):
            reader._open(os.path.join(base, file))      # fail now on a missing or truncated shard
        return reader
    return Reader({name: path for name in _names_in_file(path)}, path)


# ----------------------------------------------------------------------------- device arrays

def concrete_index(index: Sequence[slice], shape: Sequence[int]) -> tuple[slice, ...]:
    """A tuple of slices with explicit start/stop (step 1) for every dimension of `shape`."""
    out = []
    for dim, size in enumerate(shape):
        sl = index[dim] if dim < len(index) else slice(None)
        start, stop, step = sl.indices(size)
        if step != 1:
            raise ValueError(f"strided index {sl} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


def put_sharded(global_shape: Sequence[int], dtype: Any, sharding: jax.sharding.Sharding,
                read_slice: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A jax.Array laid out by `sharding`, each device's part read by `read_slice(index)`.

    `index` has an explicit `slice(start, stop)` per dimension. Only this process's
    devices are filled, and devices holding the same part (replicas) share one read.
    """
    global_shape = tuple(int(s) for s in global_shape)
    dtype = np.dtype(dtype)
    cache: dict[tuple, np.ndarray] = {}

    def callback(index):
        index = concrete_index(index, global_shape)
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            part = np.asarray(read_slice(index))
            expected = tuple(s.stop - s.start for s in index)
            if part.shape != expected:
                raise ValueError(f"read_slice({index}) returned shape {part.shape}, expected {expected}")
            cache[key] = part.astype(dtype, copy=False)
        return cache[key]

    return jax.make_array_from_callback(global_shape, sharding, callback)
