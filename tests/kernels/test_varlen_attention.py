"""Varlen flash attention (document ids) against the block-diagonal causal reference, fp32 and
fp16, forward and gradients; skipped tiles are really skipped."""

import importlib

import pytest
import torch

from starcoder.kernels import attention_reference, flash_attention
from tests.kernels.checks import DEVICE, DTYPES, TOLERANCE, assert_close, randn, upcast

fa_module = importlib.import_module("starcoder.kernels.flash_attention")

SQUARE = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}
RECT = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def ids_from_lengths(*rows):
    """Document ids [batch, seq] from per-row document lengths (ids need not start at 0)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)) * 3 + 7, torch.tensor(r))
                        for r in rows]).to(DEVICE)


# q_heads, kv_heads, head_dim, causal, window, tiles, document lengths per row. Tiles of 16/32:
# documents of length 1 (first, inside and last), documents crossing one or several tiles.
CASES = [
    pytest.param(2, 2, 32, True, None, SQUARE, [[1, 20, 1, 1, 13, 14]], id="mha-len1-cross-tiles"),
    pytest.param(4, 2, 64, True, None, RECT, [[17, 1, 31, 1], [5, 45]], id="gqa-rect-batch2"),
    pytest.param(4, 1, 32, True, 7, SQUARE, [[3, 30, 1, 16]], id="mqa-window7"),
    pytest.param(4, 2, 32, True, 20, RECT, [[40, 1, 1, 33], [75]], id="gqa-window20-rect"),
    pytest.param(2, 1, 32, True, None, SQUARE, [[1] * 15 + [10] + [1] * 4], id="mqa-many-length-1"),
    pytest.param(2, 2, 32, False, 9, SQUARE, [[12, 1, 22, 6]], id="two-sided-window9"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,causal,window,tiles,lengths", CASES)
def test_matches_block_diagonal_reference(monkeypatch, q_heads, kv_heads, head_dim, causal,
                                          window, tiles, lengths, dtype):
    monkeypatch.setattr(fa_module, "INTERPRETER_BLOCKS", tiles)
    ids = ids_from_lengths(*lengths)
    batch, seq = ids.shape
    g = torch.Generator().manual_seed(seq * 17 + q_heads)
    q = randn(batch, seq, q_heads, head_dim, dtype=dtype, generator=g)
    kv = randn(batch, seq, kv_heads, 2, head_dim, dtype=dtype, generator=g)
    k, v = kv.unbind(3)
    out = flash_attention(q, k, v, causal=causal, window=window, document_ids=ids)
    grad = randn(*out.shape, dtype=dtype, generator=g, requires_grad=False)
    dq, dkv = torch.autograd.grad(out, (q, kv), grad)

    q32, kv32 = upcast(q, kv)
    ref = attention_reference(q32, *kv32.unbind(3), causal=causal, window=window, document_ids=ids)
    dq_ref, dkv_ref = torch.autograd.grad(ref, (q32, kv32), grad.float())
    tol = TOLERANCE[dtype]
    assert_close(out, ref, tol, "out")
    assert_close(dq, dq_ref, tol, "dq")
    assert_close(dkv[:, :, :, 0], dkv_ref[:, :, :, 0], tol, "dk")
    assert_close(dkv[:, :, :, 1], dkv_ref[:, :, :, 1], tol, "dv")


def test_reference_is_each_document_alone():
    """The reference's block-diagonal mask equals running every document by itself."""
    g = torch.Generator().manual_seed(3)
    lengths = [4, 1, 9]
    ids = ids_from_lengths(lengths)
    q, k, v = (randn(1, 14, 2, 16, dtype=torch.float32, generator=g, requires_grad=False)
               for _ in range(3))
    packed = attention_reference(q, k, v, window=3, document_ids=ids)
    alone = torch.cat([attention_reference(*(t[:, a:a + n] for t in (q, k, v)), window=3)
                       for a, n in zip([0, 4, 5], lengths)], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-6)


def test_one_document_is_the_plain_kernel():
    """A single document takes the same tiles as no documents: bit-identical results."""
    g = torch.Generator().manual_seed(4)
    q = randn(1, 37, 4, 32, dtype=torch.float32, generator=g)
    kv = randn(1, 37, 2, 2, 32, dtype=torch.float32, generator=g)
    ids = torch.zeros(1, 37, dtype=torch.int32, device=DEVICE)
    grad = randn(1, 37, 4, 32, dtype=torch.float32, generator=g, requires_grad=False)
    results = []
    for document_ids in (None, ids):
        out = flash_attention(q, *kv.unbind(3), window=11, document_ids=document_ids)
        results.append((out, *torch.autograd.grad(out, (q, kv), grad)))
    for plain, varlen in zip(*results):
        torch.testing.assert_close(varlen, plain, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the poisoned rows themselves
def test_tiles_of_other_documents_are_never_read(monkeypatch):
    """Two tile-aligned documents, one filled with NaN: if a tile of it were visited (even masked:
    0 * NaN = NaN), the other document's outputs or gradients would not be finite. They are, and
    equal that document run alone."""
    monkeypatch.setattr(fa_module, "INTERPRETER_BLOCKS", SQUARE)
    g = torch.Generator().manual_seed(5)
    ids = ids_from_lengths([32, 32])
    for poisoned, kept in ((slice(0, 32), slice(32, 64)), (slice(32, 64), slice(0, 32))):
        q = randn(1, 64, 2, 32, dtype=torch.float32, generator=g, requires_grad=False)
        kv = randn(1, 64, 1, 2, 32, dtype=torch.float32, generator=g, requires_grad=False)
        grad = randn(1, 64, 2, 32, dtype=torch.float32, generator=g, requires_grad=False)
        for t in (q, kv, grad):
            t[:, poisoned] = float("nan")
        q.requires_grad_(), kv.requires_grad_()
        out = flash_attention(q, *kv.unbind(3), document_ids=ids)
        dq, dkv = torch.autograd.grad(out, (q, kv), grad)

        q1, kv1 = (t.detach()[:, kept].clone().requires_grad_() for t in (q, kv))
        alone = flash_attention(q1, *kv1.unbind(3))
        dq1, dkv1 = torch.autograd.grad(alone, (q1, kv1), grad[:, kept])
        for got, want in ((out, alone), (dq, dq1), (dkv, dkv1)):
            torch.testing.assert_close(got[:, kept], want, rtol=1e-5, atol=1e-6)


def test_documents_of_length_one_see_only_themselves():
    g = torch.Generator().manual_seed(6)
    q = randn(1, 21, 4, 32, dtype=torch.float32, generator=g)
    k, v = (randn(1, 21, 2, 32, dtype=torch.float32, generator=g) for _ in range(2))
    out = flash_attention(q, k, v, document_ids=torch.arange(21, device=DEVICE)[None])
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=2), rtol=1e-6, atol=1e-6)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5  # softmax over one key is constant
    torch.testing.assert_close(dv, torch.full_like(dv, 2.0))


def test_document_table():
    ids = torch.tensor([[5, 5, 6, 9, 9, 9], [0, 0, 0, 0, 0, 1]], device=DEVICE)
    index, starts, ends = fa_module.document_table(ids).tolist()
    assert index == [[0, 0, 1, 2, 2, 2], [0, 0, 0, 0, 0, 1]]
    assert starts == [[0, 0, 2, 3, 3, 3], [0, 0, 0, 0, 0, 5]]
    assert ends == [[2, 2, 3, 6, 6, 6], [5, 5, 5, 5, 5, 6]]


def test_bad_document_ids_are_named():
    q = torch.zeros(1, 8, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="document_ids"):
        flash_attention(q, q, q, document_ids=torch.zeros(1, 7, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="document_ids"):
        flash_attention(q, q, q, document_ids=torch.zeros(1, 8, device=DEVICE))
