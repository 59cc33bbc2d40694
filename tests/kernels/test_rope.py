"""RoPE on q and k against the rotate-half reference, with the model's own cos/sin tables."""

import pytest
import torch

from starcoder.kernels import apply_rope, rope_reference
from starcoder.models.ops import rotary_tables
from tests.kernels.checks import DEVICE, DTYPES, ELEMENTWISE_TOLERANCE, assert_close, randn, upcast


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 2, 32), (6, 1, 64), (3, 3, 128)],
                         ids=["gqa-d32", "mqa-d64-oddheads", "mha-d128"])
def test_matches_reference(q_heads, kv_heads, head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim + q_heads)
    batch, seq = 2, 11
    q = randn(batch, seq, q_heads, head_dim, dtype=dtype, generator=g)
    kv = randn(batch, seq, kv_heads, 2, head_dim, dtype=dtype, generator=g)
    k = kv[:, :, :, 0]  # a strided view, as the model's kv projection gives
    cos, sin = rotary_tables(seq + 5, head_dim, 10000.0, DEVICE)  # longer tables than needed
    q_out, k_out = apply_rope(q, k, cos, sin)
    gq, gk = (randn(*t.shape, dtype=dtype, generator=g, requires_grad=False) for t in (q_out, k_out))
    dq, dkv = torch.autograd.grad((q_out, k_out), (q, kv), (gq, gk))

    q32, kv32 = upcast(q, kv)
    q_ref, k_ref = rope_reference(q32, kv32[:, :, :, 0], cos, sin)
    dq_ref, dkv_ref = torch.autograd.grad((q_ref, k_ref), (q32, kv32), (gq.float(), gk.float()))
    tol = ELEMENTWISE_TOLERANCE[dtype]
    assert_close(q_out, q_ref, tol, "q")
    assert_close(k_out, k_ref, tol, "k")
    assert_close(dq, dq_ref, tol, "dq")
    assert_close(dkv, dkv_ref, tol, "dk")


def test_general_tables():
    """cos/sin whose two halves differ (not the model's tables) still follow the definition."""
    g = torch.Generator().manual_seed(5)
    q = randn(1, 6, 2, 32, dtype=torch.float32, generator=g)
    k = randn(1, 6, 1, 32, dtype=torch.float32, generator=g)
    cos = torch.randn(6, 32, generator=g).to(DEVICE)
    sin = torch.randn(6, 32, generator=g).to(DEVICE)
    outs = apply_rope(q, k, cos, sin)
    refs = rope_reference(q, k, cos, sin)
    for o, r in zip(outs, refs):
        assert_close(o, r, 1e-6, "rotated")
    grads = torch.autograd.grad(outs, (q, k), [torch.ones_like(o) for o in outs])
    ref_grads = torch.autograd.grad(refs, (q, k), [torch.ones_like(o) for o in outs])
    for gk, gr in zip(grads, ref_grads):
        assert_close(gk, gr, 1e-6, "grad")


def test_table_shape_error():
    q = torch.zeros(1, 8, 2, 32, device=DEVICE)
    cos, sin = rotary_tables(4, 32, 10000.0, DEVICE)
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, q, cos, sin)
