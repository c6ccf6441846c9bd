"""Corpora, the byte tokenizer and the deterministic, resumable batch iterator."""
import json

import numpy as np
import pytest

from zerojax.config import ConfigError
from zerojax.data import ByteTokenizer, TokenBatches, load_corpus, read_corpus


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x * 2  # π ≈ 3.14 — ok"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size == 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # a cut multi-byte character is replaced


def test_stdlib_corpus_is_deterministic():
    a, b = read_corpus("stdlib"), read_corpus("stdlib")
    assert a.tokens.dtype == np.uint8 and a.vocab_size == 256
    assert len(a.tokens) > 100_000 and np.array_equal(a.tokens, b.tokens)
    train, val = load_corpus({"seq_len": 64}, vocab_size=256)
    assert len(val) == int(len(a.tokens) * 0.01) and len(train) + len(val) == len(a.tokens)
    assert bytes(train[:64]) == bytes(a.tokens[:64])


def test_text_directory(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "b" / "c.md").write_text("wörld")
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")  # not UTF-8: skipped
    data = read_corpus(str(tmp_path))
    assert bytes(data.tokens).decode() == "hello wörld"
    single = read_corpus(str(tmp_path / "a.txt"))
    assert bytes(single.tokens) == b"hello "


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_token_file(tmp_path, dtype):
    ids = (np.arange(1000) * 37 % 50_000).astype(dtype)
    if dtype == "uint32":
        ids[5] = 70_000
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    section = {"corpus": str(path), "seq_len": 16, "val_fraction": 0.1}
    if dtype == "uint32":
        section["dtype"] = "uint32"
    train, val = load_corpus(section, vocab_size=100_000)
    assert isinstance(train, np.memmap) and train.dtype == dtype
    assert np.array_equal(np.concatenate([train, val]), ids) and len(val) == 100


def test_npy_token_file(tmp_path):
    ids = np.arange(500, dtype=np.int64) % 300
    np.save(tmp_path / "tokens.npy", ids)
    data = read_corpus(str(tmp_path / "tokens.npy"))
    assert data.vocab_size == 300 and np.array_equal(data.tokens, ids)
    section = {"corpus": str(tmp_path / "tokens.npy"), "seq_len": 8, "val_fraction": 0.1}
    train, val = load_corpus(section, vocab_size=300)
    assert len(train) == 450 and len(val) == 50
    train, val = load_corpus({**section, "val_fraction": 0}, vocab_size=300)
    assert len(train) == 500 and len(val) == 0  # 0: no validation split
    with pytest.raises(ConfigError, match="holds token id 299 .*at least 300"):
        load_corpus(section, vocab_size=256)


def _raises(section, vocab_size=256, match=""):
    with pytest.raises(ConfigError, match=match):
        load_corpus(section, vocab_size=vocab_size)


def test_bad_inputs(tmp_path):
    _raises({"corpus": str(tmp_path / "nope")}, match="does not exist")
    (tmp_path / "empty").mkdir()
    _raises({"corpus": str(tmp_path / "empty")}, match="is empty")
    (tmp_path / "bin_only").mkdir()
    (tmp_path / "bin_only" / "x.dat").write_bytes(b"\x00\xff")
    _raises({"corpus": str(tmp_path / "bin_only")}, match="is empty")
    (tmp_path / "zero.bin").write_bytes(b"")
    _raises({"corpus": str(tmp_path / "zero.bin")}, match="is empty")
    (tmp_path / "short.txt").write_text("abc")
    _raises({"corpus": str(tmp_path / "short.txt"), "seq_len": 8}, match=r"3 tokens.*seq_len \+ 1 = 9")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    _raises({"corpus": str(tmp_path / "odd.bin")}, match="3 bytes, not a multiple of 2")
    np.array([1, 2, 3, 300, 4] * 10, np.uint16).tofile(tmp_path / "big.bin")
    _raises({"corpus": str(tmp_path / "big.bin"), "seq_len": 4}, vocab_size=256,
            match="token id 300 .*vocab_size is 256.*at least 301")
    (tmp_path / "text.txt").write_text("x" * 100)
    _raises({"corpus": str(tmp_path / "text.txt"), "seq_len": 8, "val_fraction": 0.05},
            match=r"95 train / 5 validation")
    _raises({"corpus": str(tmp_path / "text.txt"), "seq_len": 8}, vocab_size=100,
            match=r"byte-tokenized \(ids 0..255\).*vocab_size is 100.*at least 256")
    _raises({"corpus": "stdlib", "seq_lenn": 8}, match="did you mean 'seq_len'")
    _raises({"corpus": str(tmp_path / "big.bin"), "dtype": "int8"}, match="zerojax.data.dtype")


def test_batches_are_deterministic_and_resumable():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = TokenBatches(tokens, 32, 8, seed=3, process_index=0, process_count=1)
    b = TokenBatches(tokens, 32, 8, seed=3, process_index=0, process_count=1)
    first = [a.next()["input_ids"] for _ in range(5)]
    for x, y in zip(first, [next(b)["input_ids"] for _ in range(5)]):
        assert x.dtype == np.int32 and x.shape == (8, 32) and np.array_equal(x, y)
    assert np.all(np.diff(first[0], axis=1) == 1)  # contiguous windows
    assert not np.array_equal(first[0], first[1])
    other = TokenBatches(tokens, 32, 8, seed=4, process_index=0, process_count=1)
    assert not np.array_equal(first[0], other.next()["input_ids"])

    state = json.loads(json.dumps(a.state()))
    assert state == {"index": 5, "seed": 3}
    after = [a.next()["input_ids"] for _ in range(3)]
    resumed = TokenBatches(tokens, 32, 8, seed=0, process_index=0, process_count=1)
    resumed.restore(state)
    for x, y in zip(after, [batch["input_ids"] for _, batch in zip(range(3), resumed)]):
        assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="not a TokenBatches state"):
        resumed.restore({"index": -1, "seed": 3})


def test_process_shares_concatenate_to_the_global_batch():
    tokens = np.arange(5_000, dtype=np.uint32)
    whole = TokenBatches(tokens, 16, 8, seed=1, process_index=0, process_count=1)
    parts = [TokenBatches(tokens, 16, 8, seed=1, process_index=i, process_count=2) for i in range(2)]
    for _ in range(4):
        shares = [p.next()["input_ids"] for p in parts]
        assert all(s.shape == (4, 16) for s in shares)
        assert np.array_equal(np.concatenate(shares), whole.next()["input_ids"])
    with pytest.raises(ConfigError, match="multiple of 3"):
        TokenBatches(tokens, 16, 8, process_index=0, process_count=3)
    default = TokenBatches(tokens, 16, 8)  # process index / count from jax
    assert default.rows == 8


def test_train_and_val_are_disjoint(tmp_path):
    ids = np.arange(2_000, dtype=np.uint16)
    ids.tofile(tmp_path / "t.bin")
    train, val = load_corpus({"corpus": str(tmp_path / "t.bin"), "seq_len": 16, "val_fraction": 0.1},
                             vocab_size=2_000)
    assert len(train) == 1800 and len(val) == 200
    assert not set(train.tolist()) & set(val.tolist())
    for batches, part in ((TokenBatches(train, 16, 4, process_count=1, process_index=0), train),
                          (TokenBatches(val, 16, 4, process_count=1, process_index=0), val)):
        for _ in range(20):
            x = batches.next()["input_ids"]
            assert x.min() >= part[0] and x.max() <= part[-1]
