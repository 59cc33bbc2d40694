"""The .bin/.idx format against megatron-core 0.16.1's IndexedDataset (the format oracle)."""

import os

import numpy as np
import pytest
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from starcoder.data.indexed import IndexedTokens, IndexedWriter, token_dtype


def _documents(seed: int, count: int, high: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=rng.integers(1, 300)) for _ in range(count)]


@pytest.mark.parametrize("vocab", [49152, 100_000])
def test_megatron_core_reads_our_files(tmp_path, vocab):
    dtype = token_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65500 else np.int32)
    docs = _documents(0, 50, vocab)
    with IndexedWriter(tmp_path / "ours", dtype) as w:
        w.add_document(docs[0])
        w.add_documents(np.concatenate(docs[1:]), np.array([len(d) for d in docs[1:]]))
    theirs = IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs) and theirs.index.dtype == dtype
    assert list(theirs.document_indices) == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(theirs[i], d)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatron_core_files(tmp_path, dtype):
    docs = _documents(1, 40, 60000)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for d in docs:
        builder.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    builder.finalize(str(tmp_path / "theirs.idx"))
    ours = IndexedTokens(tmp_path / "theirs")
    assert len(ours) == len(docs) and ours.dtype == dtype
    assert ours.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ours[i], d)


def test_an_interrupted_write_leaves_no_index(tmp_path):
    prefix = tmp_path / "data"
    with pytest.raises(RuntimeError):
        with IndexedWriter(prefix, np.uint16) as w:
            w.add_document(np.arange(10))
            raise RuntimeError("killed")
    assert not os.listdir(tmp_path)  # no .idx, and the staged .bin is gone too
    with IndexedWriter(prefix, np.uint16) as w:  # a finished dataset ...
        w.add_document(np.arange(10))
    with pytest.raises(RuntimeError):
        with IndexedWriter(prefix, np.uint16) as w:  # ... survives a failed rewrite
            w.add_document(np.arange(99))
            raise RuntimeError("killed")
    np.testing.assert_array_equal(IndexedTokens(prefix)[0], np.arange(10))
    # a crash before finish() leaves only staged files, never an .idx next to a new .bin
    w = IndexedWriter(tmp_path / "crash", np.uint16)
    w.add_document(np.arange(5))
    w._bin.flush()
    assert not (tmp_path / "crash.idx").exists() and not (tmp_path / "crash.bin").exists()
    w.abort()


def test_clear_errors_for_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="did preprocessing finish"):
        IndexedTokens(tmp_path / "missing")
    (tmp_path / "bad.idx").write_bytes(b"not an index at all, no no no no")
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="bad magic"):
        IndexedTokens(tmp_path / "bad")
    with IndexedWriter(tmp_path / "short", np.uint16) as w:
        w.add_document(np.arange(100))
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(50)
    with pytest.raises(ValueError, match="describes 200"):
        IndexedTokens(tmp_path / "short")
