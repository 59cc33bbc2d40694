"""Index builders and the batch gather: the C++ extension (`starcoder.data._helpers`, csrc/) and a
pure-Python reference with identical results (tests check one against the other).

Shuffles are our own, not NumPy's, so that C++ can reproduce them at memory speed: a uniform
random permutation by Rao-Sandelius (scatter every element to one of K buckets drawn from a
counter-based hash, keeping input order inside a bucket, then Fisher-Yates each bucket with its
own generator). Buckets are sized to stay in cache, which is what makes the C++ version fast.

The sample index follows megatron-core's `build_sample_idx` exactly (samples of seq_length + 1
tokens overlapping by one; entry k = (position in doc_idx, offset in that document)), and the
blending index its greedy `build_blending_indices`.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

try:  # built by `pip install -e .` from csrc/data_helpers.cpp
    from starcoder.data import _helpers as cpp
except ImportError:  # pragma: no cover - exercised only where the extension is missing
    cpp = None

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
BUCKET_BITS = 16  # about 2**16 elements per bucket: 256 KiB of int32, fits L2


def default_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def use_cpp(backend: Optional[str]) -> bool:
    if backend == "python":
        return False
    if backend == "cpp" and cpp is None:
        raise ImportError("starcoder.data._helpers is not built (run `pip install -e .`)")
    return cpp is not None


# ---------------------------------------------------------------------------------------------
# Random permutations


def mix64(x: int) -> int:
    """splitmix64's finaliser."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & M64
    return x ^ (x >> 31)


def _mix64_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def stream_key(seed: int, stream: int) -> int:
    return mix64((mix64(seed & M64) ^ (stream * GOLDEN & M64)) & M64)


def num_buckets(n: int) -> int:
    return max(1, -(-n >> BUCKET_BITS))


def permutation(n: int, seed: int, stream: int, backend: Optional[str] = None) -> np.ndarray:
    """A uniform random permutation of range(n) (int64), a pure function of (n, seed, stream)."""
    if use_cpp(backend):
        return cpp.permutation(n, stream_key(seed, stream), default_threads())
    key = stream_key(seed, stream)
    k = num_buckets(n)
    with np.errstate(over="ignore"):
        h = _mix64_np(np.uint64(key) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GOLDEN)))
    # bucket = (h * k) >> 64 without 128-bit integers (k < 2**31)
    hi, lo = h >> np.uint64(32), h & np.uint64(0xFFFFFFFF)
    bucket = (hi * np.uint64(k) + ((lo * np.uint64(k)) >> np.uint64(32))) >> np.uint64(32)
    order = np.argsort(bucket, kind="stable")
    counts = np.bincount(bucket.astype(np.int64), minlength=k)
    out = order.astype(np.int64)
    start = 0
    for b in range(k):
        stop = start + int(counts[b])
        _fisher_yates(out, start, stop, mix64((key ^ ((b + 1) * 0xD1B54A32D192ED03 & M64)) & M64))
        start = stop
    return out


def _fisher_yates(a: np.ndarray, start: int, stop: int, state: int) -> None:
    for j in range(stop - start - 1, 0, -1):
        state = (state + GOLDEN) & M64
        r = mix64(state)
        i = (r * (j + 1)) >> 64
        a[start + j], a[start + i] = a[start + i], a[start + j]


def document_index(first: int, last: int, num_epochs: int, separate_last_epoch: bool, seed: int,
                   stream: int, sizes: np.ndarray, backend: Optional[str] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Documents [first, last) repeated num_epochs times and shuffled (int32), the last epoch
    shuffled on its own when `separate_last_epoch` (Megatron's rule for a small final epoch), and
    their sizes in that order (what `sample_index` reads)."""
    n = last - first
    if use_cpp(backend):
        return tuple(cpp.document_index(first, last, num_epochs, separate_last_epoch,
                                        stream_key(seed, stream), stream_key(seed, stream + 1),
                                        np.ascontiguousarray(sizes, dtype=np.int32), default_threads()))
    together = num_epochs - 1 if separate_last_epoch and num_epochs > 1 else num_epochs
    parts = [permutation(together * n, seed, stream, "python") % n]
    if together < num_epochs:
        parts.append(permutation(n, seed, stream + 1, "python"))
    doc_idx = (np.concatenate(parts) + first).astype(np.int32)
    return doc_idx, np.asarray(sizes)[doc_idx].astype(np.int32)


def shuffle_index(first: int, total: int, seed: int, stream: int, backend: Optional[str] = None) -> np.ndarray:
    """A permutation of [0, first) followed by one of [first, total); uint32, or int64 if large."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    if use_cpp(backend):
        return cpp.shuffle_index(first, total, stream_key(seed, stream), stream_key(seed, stream + 1),
                                 default_threads())
    parts = [permutation(first, seed, stream, "python")]
    if total > first:
        parts.append(permutation(total - first, seed, stream + 1, "python") + first)
    return np.concatenate(parts).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Sample and blending indices (megatron-core semantics)


def sample_index(doc_sizes: np.ndarray, seq_length: int, num_samples: int,
                 backend: Optional[str] = None) -> np.ndarray:
    """[num_samples + 1, 2]: (position in doc_idx, token offset) where each sample starts; sample k
    runs to entry k + 1 plus one token. `doc_sizes[k]` is the size of document doc_idx[k].
    megatron-core's build_sample_idx(sizes, doc_idx, ...) with num_samples = (tokens - 1) // seq.
    int32, or int64 when positions need it."""
    wide = len(doc_sizes) > np.iinfo(np.int32).max
    if use_cpp(backend):
        return cpp.sample_index(np.ascontiguousarray(doc_sizes, dtype=np.int32), seq_length, num_samples, wide)
    out = np.zeros((num_samples + 1, 2), dtype=np.int64 if wide else np.int32)
    position, offset = 0, 0
    for k in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining:
            length = int(doc_sizes[position]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                if position == len(doc_sizes) - 1:
                    offset = int(doc_sizes[position]) - 1
                    break
                position += 1
                offset = 0
        out[k] = position, offset
    return out


def blending_index(weights: np.ndarray, size: int, backend: Optional[str] = None):
    """(dataset_index int16, dataset_sample_index int64): sample i comes from the source whose
    count lags its target share the most (megatron-core's greedy rule)."""
    weights = np.asarray(weights, dtype=np.float64)
    if use_cpp(backend):
        return cpp.blending_index(weights, size)
    which = np.zeros(size, dtype=np.int16)
    within = np.zeros(size, dtype=np.int64)
    counts = [0] * len(weights)
    for i in range(size):
        scale = max(float(i), 1.0)
        best, best_err = 0, weights[0] * scale - counts[0]
        for d in range(1, len(weights)):
            err = weights[d] * scale - counts[d]
            if err > best_err:
                best, best_err = d, err
        which[i], within[i] = best, counts[best]
        counts[best] += 1
    return which, within


# ---------------------------------------------------------------------------------------------
# Gather: samples straight from the memory-mapped .bin into one contiguous array


def gather(out: np.ndarray, rows: np.ndarray, samples: np.ndarray, tokens: np.ndarray,
           pointers: np.ndarray, sizes: np.ndarray, doc_idx: np.ndarray, sample_idx: np.ndarray,
           backend: Optional[str] = None) -> None:
    """out[rows[j]] = tokens of sample samples[j] (len out.shape[1] = seq_length + 1)."""
    if use_cpp(backend):
        threads = default_threads() if out.shape[1] * len(rows) >= (1 << 20) else 1
        cpp.gather(out, np.ascontiguousarray(rows, dtype=np.int64),
                   np.ascontiguousarray(samples, dtype=np.int64), tokens, pointers, sizes, doc_idx,
                   sample_idx, threads)
        return
    item = tokens.dtype.itemsize
    width = out.shape[1]
    for row, s in zip(rows, samples):
        (p0, o0), (p1, o1) = sample_idx[s], sample_idx[s + 1]
        filled = 0
        for p in range(int(p0), int(p1) + 1):
            doc = int(doc_idx[p])
            begin = int(o0) if p == p0 else 0
            end = int(o1) + 1 if p == p1 else int(sizes[doc])
            start = int(pointers[doc]) // item + begin
            out[row, filled:filled + end - begin] = tokens[start:start + end - begin]
            filled += end - begin
        assert filled == width, (filled, width)
