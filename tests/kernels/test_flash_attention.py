"""Flash attention against the fp32 reference and SDPA with an explicit mask, forward and grads."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from starcoder.kernels import attention_reference, flash_attention
from tests.kernels.checks import DEVICE, DTYPES, TOLERANCE, assert_close, randn, upcast

# The module (its name is shadowed by the function `starcoder.kernels` exports).
fa_module = importlib.import_module("starcoder.kernels.flash_attention")

# batch, seq, q_heads, kv_heads, head_dim, causal, window, interpreter tiles (fwd, dkdv, dq).
# Lengths are not multiples of the tiles; rectangular tiles exercise the range arithmetic.
SQUARE = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}
RECT = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}
CASES = [
    pytest.param(1, 37, 2, 2, 32, True, None, SQUARE, id="causal-mha-d32-s37"),
    pytest.param(2, 50, 4, 2, 64, True, None, RECT, id="causal-gqa-d64-s50-rect"),
    pytest.param(1, 45, 4, 1, 32, True, 13, SQUARE, id="causal-mqa-window13-s45"),
    pytest.param(1, 48, 2, 1, 32, True, 16, RECT, id="causal-mqa-window16-aligned-s48"),
    pytest.param(1, 100, 4, 2, 32, True, 40, SQUARE, id="causal-gqa-window40-interior-s100"),
    pytest.param(1, 23, 2, 1, 32, True, 2, SQUARE, id="causal-window2-s23"),
    pytest.param(1, 33, 2, 2, 128, False, None, SQUARE, id="full-d128-s33"),
    pytest.param(1, 41, 4, 2, 32, False, 9, RECT, id="two-sided-window9-s41"),
    # A longer sequence (the 1000) with larger interpreter tiles, to stay quick.
    pytest.param(1, 1000, 2, 1, 32, True, 257, {"fwd": (64, 64), "dkdv": (64, 128), "dq": (128, 64)},
                 id="causal-mqa-window257-s1000"),
    pytest.param(1, 1000, 2, 2, 64, True, None, {"fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64)},
                 id="causal-mha-d64-s1000"),
]


def explicit_mask(seq, causal, window):
    i = torch.arange(seq, device=DEVICE)[:, None]
    j = torch.arange(seq, device=DEVICE)[None, :]
    mask = torch.ones(seq, seq, dtype=torch.bool, device=DEVICE)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= (i - j).abs() < window
    return mask


def sdpa(q, k, v, causal, window):
    mask = explicit_mask(q.shape[1], causal, window)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq,q_heads,kv_heads,head_dim,causal,window,tiles", CASES)
def test_matches_reference_and_sdpa(monkeypatch, batch, seq, q_heads, kv_heads, head_dim, causal,
                                    window, tiles, dtype):
    monkeypatch.setattr(fa_module, "INTERPRETER_BLOCKS", tiles)
    g = torch.Generator().manual_seed(seq * 131 + head_dim)
    q = randn(batch, seq, q_heads, head_dim, dtype=dtype, generator=g)
    # k and v as the model makes them: interleaved views of one projection (non-contiguous).
    kv = randn(batch, seq, kv_heads, 2, head_dim, dtype=dtype, generator=g)
    k, v = kv.unbind(3)
    out = flash_attention(q, k, v, causal=causal, window=window)
    grad = randn(*out.shape, dtype=dtype, generator=g, requires_grad=False)
    dq, dkv = torch.autograd.grad(out, (q, kv), grad)

    q32, kv32 = upcast(q, kv)
    k32, v32 = kv32.unbind(3)
    ref = attention_reference(q32, k32, v32, causal=causal, window=window)
    dq_ref, dkv_ref = torch.autograd.grad(ref, (q32, kv32), grad.float())
    tol = TOLERANCE[dtype]
    assert_close(out, ref, tol, "out")
    assert_close(out, sdpa(q32.detach(), k32.detach(), v32.detach(), causal, window), tol, "out vs SDPA")
    assert_close(dq, dq_ref, tol, "dq")
    assert_close(dkv[:, :, :, 0], dkv_ref[:, :, :, 0], tol, "dk")
    assert_close(dkv[:, :, :, 1], dkv_ref[:, :, :, 1], tol, "dv")


def test_window_covering_sequence_is_plain_causal():
    g = torch.Generator().manual_seed(0)
    q, k, v = (randn(1, 20, 2, 32, dtype=torch.float32, generator=g, requires_grad=False)
               for _ in range(3))
    torch.testing.assert_close(flash_attention(q, k, v, window=20), flash_attention(q, k, v),
                               rtol=0, atol=0)


def test_window_one_sees_only_itself():
    g = torch.Generator().manual_seed(2)
    q = randn(1, 21, 4, 32, dtype=torch.float32, generator=g)
    k, v = (randn(1, 21, 2, 32, dtype=torch.float32, generator=g) for _ in range(2))
    out = flash_attention(q, k, v, window=1)
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=2), rtol=1e-6, atol=1e-6)
    dq, dv = torch.autograd.grad(out.sum(), (q, v))
    assert dq.abs().max() < 1e-5  # softmax over one key is constant
    torch.testing.assert_close(dv, torch.full_like(dv, 2.0))


def test_scale_is_applied():
    g = torch.Generator().manual_seed(1)
    q, k, v = (randn(1, 19, 2, 32, dtype=torch.float32, generator=g, requires_grad=False)
               for _ in range(3))
    assert_close(flash_attention(q, k, v, scale=0.3), attention_reference(q, k, v, scale=0.3),
                 TOLERANCE[torch.float32], "scaled")


@pytest.mark.parametrize("shapes,message", [
    (((1, 8, 4, 32), (1, 8, 3, 32)), "not a multiple"),
    (((1, 8, 2, 48), (1, 8, 2, 48)), "head_dim 48"),
    (((1, 8, 2, 32), (1, 9, 2, 32)), "do not match"),
])
def test_bad_shapes_are_named(shapes, message):
    q = torch.zeros(shapes[0], device=DEVICE)
    k = torch.zeros(shapes[1], device=DEVICE)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, k)


def test_bad_window_and_dtype():
    q = torch.zeros(1, 8, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, q, q, window=0)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        flash_attention(q.double(), q.double(), q.double())


def test_group_splits_spread_mqa_over_programs():
    """dK/dV programs split a KV head's query heads until ~2 programs per multiprocessor."""
    cpu = torch.device("cpu")  # counts as 4 multiprocessors: target 8 programs
    assert fa_module._group_splits(1, 1, cpu) == 1  # MHA: nothing to split
    assert fa_module._group_splits(16, 1, cpu) == 8
    assert fa_module._group_splits(6, 2, cpu) == 6  # divisors only: 3 gives 6 programs < 8
    assert fa_module._group_splits(4, 64, cpu) == 1  # enough programs already
