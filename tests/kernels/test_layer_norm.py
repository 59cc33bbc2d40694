"""LayerNorm (with and without the fused residual add) against F.layer_norm in fp32."""

import pytest
import torch

from starcoder.kernels import layer_norm, layer_norm_reference
from tests.kernels.checks import DEVICE, DTYPES, ELEMENTWISE_TOLERANCE, assert_close, randn, upcast


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 50), (5, 256)], ids=["hidden50-3d", "hidden256"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_reference(shape, residual, dtype):
    g = torch.Generator().manual_seed(shape[-1] + residual)
    x = randn(*shape, dtype=dtype, generator=g, scale=3.0)
    w = randn(shape[-1], dtype=dtype, generator=g)
    b = randn(shape[-1], dtype=dtype, generator=g)
    inputs = [x, w, b] + ([randn(*shape, dtype=dtype, generator=g)] if residual else [])
    out = layer_norm(*inputs[:3], 1e-5, *inputs[3:])
    outs = out if residual else (out,)
    grads_out = [randn(*o.shape, dtype=dtype, generator=g, requires_grad=False) for o in outs]
    grads = torch.autograd.grad(outs, inputs, grads_out)

    ref_inputs = upcast(*inputs)
    ref = layer_norm_reference(*ref_inputs[:3], 1e-5, *ref_inputs[3:])
    ref_outs = ref if residual else (ref,)
    ref_grads = torch.autograd.grad(ref_outs, ref_inputs, [t.float() for t in grads_out])
    tol = ELEMENTWISE_TOLERANCE[dtype]
    for name, o, r in zip(("y", "h"), outs, ref_outs):
        assert_close(o, r, tol, name)
    for name, gk, gr in zip(("dx", "dw", "db", "dresidual"), grads, ref_grads):
        assert_close(gk, gr, 2 * tol, name)


def test_mixed_precision_weights():
    """fp32 LayerNorm parameters with bf16/fp16 activations (no autocast needed)."""
    g = torch.Generator().manual_seed(3)
    x = randn(4, 64, dtype=torch.float16, generator=g)
    w, b = randn(64, dtype=torch.float32, generator=g), randn(64, dtype=torch.float32, generator=g)
    y = layer_norm(x, w, b, 1e-5)
    assert y.dtype == torch.float16
    dw = torch.autograd.grad(y.float().sum(), w)[0]
    assert dw.dtype == torch.float32
    assert_close(y, layer_norm_reference(x.float(), w, b, 1e-5), 2e-3, "y")


def test_shape_errors_are_named():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, torch.ones(7, device=DEVICE), torch.zeros(8, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        layer_norm(x, torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE), 1e-5,
                   residual=torch.zeros(2, 9, device=DEVICE))
