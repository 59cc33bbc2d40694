"""The C++ index builders and gather against the Python reference and megatron-core's helpers."""

import numpy as np
import pytest

from megatron.core.datasets import helpers_cpp as mcore
from starcoder.data import helpers
from starcoder.data.indexed import IndexedTokens, IndexedWriter

pytestmark = pytest.mark.skipif(helpers.cpp is None, reason="C++ extension not built")


@pytest.mark.parametrize("n", [0, 1, 2, 17, 65_536, 140_001])
def test_permutation_cpp_equals_python(n):
    ours = helpers.permutation(n, seed=5, stream=3, backend="cpp")
    np.testing.assert_array_equal(ours, helpers.permutation(n, seed=5, stream=3, backend="python"))
    np.testing.assert_array_equal(np.sort(ours), np.arange(n))


def test_permutation_is_independent_of_threads_and_uniform():
    key = helpers.stream_key(9, 1)
    one = helpers.cpp.permutation(300_000, key, 1)
    np.testing.assert_array_equal(one, helpers.cpp.permutation(300_000, key, 4))
    assert not np.array_equal(one, helpers.permutation(300_000, 9, 2))  # streams differ
    # where each of 6 elements lands over many seeds: uniform (chi-square, 25 dof, p ~ 1e-4)
    counts = np.zeros((6, 6))
    for seed in range(3000):
        perm = helpers.permutation(6, seed, 0)
        counts[np.arange(6), perm] += 1
    chi2 = ((counts - 500) ** 2 / 500).sum()
    assert chi2 < 60, counts


@pytest.mark.parametrize("separate", [False, True])
def test_document_and_shuffle_index_cpp_equals_python(separate):
    sizes = np.random.default_rng(0).integers(1, 100, size=1100).astype(np.int32)
    a, a_sizes = helpers.document_index(7, 1007, 3, separate, seed=1, stream=16, sizes=sizes, backend="cpp")
    b, b_sizes = helpers.document_index(7, 1007, 3, separate, seed=1, stream=16, sizes=sizes, backend="python")
    assert a.dtype == b.dtype == a_sizes.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a_sizes, sizes[a])  # sizes carried through the shuffle
    np.testing.assert_array_equal(b_sizes, sizes[a])
    np.testing.assert_array_equal(np.bincount(a - 7), np.full(1000, 3))  # every document 3 times
    if separate:  # the last epoch is shuffled on its own: it holds each document once
        np.testing.assert_array_equal(np.sort(a[2000:]), np.arange(7, 1007))
    s1 = helpers.shuffle_index(900, 1300, seed=2, stream=18, backend="cpp")
    s2 = helpers.shuffle_index(900, 1300, seed=2, stream=18, backend="python")
    assert s1.dtype == s2.dtype == np.uint32
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(np.sort(s1[:900]), np.arange(900))
    np.testing.assert_array_equal(np.sort(s1[900:]), np.arange(900, 1300))


@pytest.mark.parametrize("seq_length", [2, 64, 1000])
def test_sample_index_equals_megatron_core(seq_length):
    sizes = np.random.default_rng(seq_length).integers(1, 400, size=700).astype(np.int32)
    doc_idx, doc_sizes = helpers.document_index(0, 700, 2, False, seed=3, stream=0, sizes=sizes)
    tokens = int(sizes.sum())
    num_samples = (2 * tokens - 1) // seq_length
    ours = helpers.sample_index(doc_sizes, seq_length, num_samples, backend="cpp")
    theirs = mcore.build_sample_idx_int32(sizes, doc_idx, seq_length, 2, tokens, True, 1)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(helpers.sample_index(doc_sizes, seq_length, num_samples, backend="python"),
                                  theirs)


def test_blending_index_equals_megatron_core_and_hits_weights():
    weights = np.array([0.5, 0.2, 0.25, 0.05])
    size = 20_000
    which, within = helpers.blending_index(weights, size, backend="cpp")
    w_ref, n_ref = np.zeros(size, np.int16), np.zeros(size, np.int64)
    mcore.build_blending_indices(w_ref, n_ref, weights, len(weights), size, False)
    np.testing.assert_array_equal(which, w_ref)
    np.testing.assert_array_equal(within, n_ref)
    py_which, py_within = helpers.blending_index(weights, 3000, backend="python")
    np.testing.assert_array_equal(py_which, which[:3000])
    np.testing.assert_array_equal(py_within, within[:3000])
    np.testing.assert_allclose(np.bincount(which) / size, weights, atol=0.01)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_gather_cpp_equals_python_and_concatenation(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30000, size=rng.integers(1, 50)) for _ in range(300)]
    with IndexedWriter(tmp_path / "d", dtype) as w:
        for d in docs:
            w.add_document(d)
    data = IndexedTokens(tmp_path / "d")
    doc_idx, doc_sizes = helpers.document_index(0, 300, 1, False, seed=4, stream=0, sizes=data.sizes)
    sample_idx = helpers.sample_index(doc_sizes, 16, (data.num_tokens - 1) // 16)
    samples = rng.permutation(len(sample_idx) - 1)[:40].astype(np.int64)
    rows = rng.permutation(40).astype(np.int64)
    out = {}
    for backend in ("cpp", "python"):
        out[backend] = np.full((40, 17), -1, dtype=np.int64)
        helpers.gather(out[backend], rows, samples, data.tokens, data.pointers, data.sizes, doc_idx,
                       sample_idx, backend=backend)
    np.testing.assert_array_equal(out["cpp"], out["python"])
    stream = np.concatenate([docs[d] for d in doc_idx])  # windows of 17 tokens, sharing one
    for row, s in zip(rows, samples):
        np.testing.assert_array_equal(out["cpp"][row], stream[16 * s:16 * s + 17])
    big = np.zeros((40, 17), np.int64)  # several threads give the same bytes
    helpers.cpp.gather(big, rows, samples, data.tokens, data.pointers, data.sizes, doc_idx, sample_idx, 4)
    np.testing.assert_array_equal(big, out["cpp"])
    with pytest.raises(RuntimeError, match="out of range"):
        helpers.cpp.gather(big, rows[:1], np.array([10**6]), data.tokens, data.pointers, data.sizes,
                           doc_idx, sample_idx, 1)
    with pytest.raises(ValueError, match="sizes: expected a C-contiguous int32"):
        helpers.cpp.gather(big, rows, samples, data.tokens, data.pointers, data.sizes.astype(np.int64),
                           doc_idx, sample_idx, 1)
