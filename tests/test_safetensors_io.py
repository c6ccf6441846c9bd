"""Streamed safetensors writer, sharded directories, slice reads and device-sharded loads."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import load_file

from zerojax.errors import CheckpointError
from zerojax.safetensors_io import (BF16, open_checkpoint_dir, put_sharded, write_safetensors,
                                    write_sharded)


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "b.weight": rng.normal(size=(6, 5)).astype(np.float32),
        "a.bf16": rng.normal(size=(3, 4, 2)).astype(BF16),
        "c.ids": rng.integers(-50, 50, size=(7,), dtype=np.int32),
        "d.scalar": np.asarray(3.5, np.float32),
        "e.empty": np.zeros((0, 3), np.float32),
    }


def _write(path, tensors, **kw):
    fetched = []

    def fetch(name):
        fetched.append(name)
        return tensors[name]

    write_safetensors(path, [(n, t.shape, t.dtype) for n, t in tensors.items()], fetch, **kw)
    return fetched


def test_round_trip_with_the_reference_reader(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "x.safetensors")
    fetched = _write(path, tensors, metadata={"format": "pt", "step": 7})
    assert sorted(fetched) == sorted(tensors) and len(fetched) == len(tensors)   # each fetched once
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "step": "7"}
    raw = open(path, "rb").read()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    header = json.loads(raw[8:8 + header_len])
    assert header["b.weight"]["dtype"] == "F32" and header["a.bf16"]["dtype"] == "BF16"
    assert header["c.ids"]["dtype"] == "I32"
    assert os.listdir(tmp_path) == ["x.safetensors"]              # no stray .tmp


def test_fetch_is_cast_and_checked(tmp_path):
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, [("w", (2, 3), BF16)], lambda n: np.ones((2, 3), np.float32))
    assert load_file(path)["w"].dtype == BF16
    with pytest.raises(ValueError, match="shape"):
        write_safetensors(path, [("w", (2, 3), np.float32)], lambda n: np.ones((3, 2), np.float32))
    assert os.listdir(tmp_path) == ["x.safetensors"]               # the failed write left no .tmp
    with pytest.raises(ValueError, match="twice"):
        write_safetensors(path, [("w", (1,), np.float32)] * 2, lambda n: np.ones(1, np.float32))


def test_sharded_write_index_and_reader(tmp_path):
    tensors = {f"t{i}": np.full((4, 8), i, np.float32) for i in range(5)}     # 128 bytes each
    entries = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    files = write_sharded(str(tmp_path), entries, tensors.__getitem__, max_shard_bytes=300)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 128
    assert index["weight_map"] == {"t0": shards[0], "t1": shards[0], "t2": shards[1],
                                   "t3": shards[1], "t4": shards[2]}
    reader = open_checkpoint_dir(str(tmp_path))
    assert reader.names() == sorted(tensors)
    assert reader.shape("t3") == (4, 8) and reader.dtype("t3") == np.float32
    np.testing.assert_array_equal(reader.read("t4"), tensors["t4"])
    np.testing.assert_array_equal(reader.read("t2", (slice(1, 3), slice(2, 8))), tensors["t2"][1:3, 2:8])

    # The same names fitting in one file: a single model.safetensors, old shards removed.
    files = write_sharded(str(tmp_path), entries, tensors.__getitem__, max_shard_bytes=10_000)
    assert files == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    np.testing.assert_array_equal(open_checkpoint_dir(str(tmp_path)).read("t1"), tensors["t1"])


def test_truncated_file_is_a_checkpoint_error_naming_it(tmp_path):
    tensors = _tensors()
    path = str(tmp_path / "model.safetensors")
    _write(path, tensors)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        open_checkpoint_dir(str(tmp_path))
    open(path, "wb").write(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint_dir(path)


def test_truncated_or_missing_shard_and_missing_tensor(tmp_path):
    tensors = {f"t{i}": np.full((4, 8), i, np.float32) for i in range(3)}
    write_sharded(str(tmp_path), [(n, t.shape, t.dtype) for n, t in tensors.items()],
                  tensors.__getitem__, max_shard_bytes=128)
    reader = open_checkpoint_dir(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"index\.json.*no tensor 'nope'"):
        reader.read("nope")
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        open_checkpoint_dir(str(tmp_path))
    shard.unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: file is missing"):
        open_checkpoint_dir(str(tmp_path))


def test_missing_directory_or_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint_dir(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        open_checkpoint_dir(str(tmp_path))


def test_put_sharded_reads_only_each_devices_slice(tmp_path):
    full = np.arange(8 * 6 * 4, dtype=np.float32).reshape(8, 6, 4)
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, [("w", full.shape, BF16)], lambda n: full)
    reader = open_checkpoint_dir(path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec("data", None, "tensor"))
    reads = []

    def read_slice(index):
        reads.append(index)
        return reader.read("w", index)

    array = put_sharded(full.shape, np.float32, sharding, read_slice)
    assert array.dtype == np.float32 and array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), full)       # small ints: exact in bf16
    assert len(reads) == 8
    assert all((s.stop - s.start, t.stop - t.start) == (2, 2) for s, _, t in reads)

    replicated = NamedSharding(mesh, PartitionSpec(None, None, "tensor"))
    reads.clear()
    put_sharded(full.shape, np.float32, replicated, read_slice)
    assert len(reads) == 2                                         # replicas share one read
