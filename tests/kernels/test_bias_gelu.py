"""Bias + GeLU-tanh against F.gelu(x + bias, approximate="tanh") in fp32."""

import pytest
import torch

from starcoder.kernels import bias_gelu, bias_gelu_reference
from tests.kernels.checks import DEVICE, DTYPES, ELEMENTWISE_TOLERANCE, assert_close, randn, upcast


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 70), (33, 64)], ids=["3d-cols70", "rows33"])
def test_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    x = randn(*shape, dtype=dtype, generator=g, scale=3.0)  # reaches both tails of the tanh
    b = randn(shape[-1], dtype=dtype, generator=g)
    y = bias_gelu(x, b)
    grad = randn(*y.shape, dtype=dtype, generator=g, requires_grad=False)
    dx, db = torch.autograd.grad(y, (x, b), grad)
    x32, b32 = upcast(x, b)
    ref = bias_gelu_reference(x32, b32)
    dx_ref, db_ref = torch.autograd.grad(ref, (x32, b32), grad.float())
    tol = ELEMENTWISE_TOLERANCE[dtype]
    assert_close(y, ref, tol, "y")
    assert_close(dx, dx_ref, tol, "dx")
    assert_close(db, db_ref, tol, "db")


def test_bias_shape_error():
    with pytest.raises(ValueError, match="bias"):
        bias_gelu(torch.zeros(2, 8, device=DEVICE), torch.zeros(4, device=DEVICE))
