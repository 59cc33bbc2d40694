"""Bias + dropout + residual add against residual + F.dropout(x + bias) in fp32: exact without
dropout; with dropout, the reference applied with the kernel's own mask, the keep rate, the seed's
determinism and a backward that regenerates the forward's mask."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from starcoder.kernels import bias_dropout_add, bias_dropout_add_reference, draw_seed
from tests.kernels.checks import DEVICE, DTYPES, ELEMENTWISE_TOLERANCE, assert_close, randn, upcast

SHAPES = [(3, 5, 70), (33, 64)]  # not tile multiples; 3-d and 2-d


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, residual = randn(*shape, dtype=dtype, generator=g), randn(*shape, dtype=dtype, generator=g)
    bias = randn(shape[-1], dtype=dtype, generator=g)
    grad = randn(*shape, dtype=dtype, generator=g, requires_grad=False)
    return x, bias, residual, grad


def _kernel_mask(shape, dtype, p, seed):
    """The mask the kernel draws for `seed`: ones through it come out as 0 or 1 / (1 - p)."""
    ones = torch.ones(shape, dtype=dtype, device=DEVICE)
    zeros = torch.zeros(shape[-1], dtype=dtype, device=DEVICE)
    return bias_dropout_add(ones, zeros, torch.zeros_like(ones), p, seed) != 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=["3d-cols70", "rows33"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no-dropout", "dropout0.3"])
def test_matches_reference(shape, dtype, p):
    x, bias, residual, grad = _inputs(shape, dtype, shape[-1])
    seed = draw_seed(DEVICE)
    y = bias_dropout_add(x, bias, residual, p, seed)
    dx, db, dr = torch.autograd.grad(y, (x, bias, residual), grad)

    mask = _kernel_mask(shape, dtype, p, seed) if p > 0 else None
    x32, b32, r32 = upcast(x, bias, residual)
    ref = bias_dropout_add_reference(x32, b32, r32, p, mask)
    dx_ref, db_ref, dr_ref = torch.autograd.grad(ref, (x32, b32, r32), grad.float())
    tol = ELEMENTWISE_TOLERANCE[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and db.dtype == dtype
    assert_close(y, ref, tol, "y")
    assert_close(dx, dx_ref, tol, "dx")
    assert_close(db, db_ref, tol, "dbias")
    assert_close(dr, dr_ref, tol, "dresidual")
    if p > 0:  # the backward's regenerated mask is the forward's, element for element
        assert torch.equal(dx == 0, ~mask | (grad == 0))


def test_keep_rate_and_seed_determinism():
    shape, p = (64, 256), 0.25
    seed = draw_seed(DEVICE)
    mask = _kernel_mask(shape, torch.float32, p, seed)
    n = mask.numel()
    # Binomial(n, 1 - p): 5 standard deviations either way.
    assert abs(mask.sum().item() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))
    # Neither constant along rows nor along columns (offsets cover the whole [rows, n] view).
    assert 0 < mask.float().mean(0).min() and mask.float().mean(0).max() < 1
    assert 0 < mask.float().mean(1).min() and mask.float().mean(1).max() < 1
    assert torch.equal(mask, _kernel_mask(shape, torch.float32, p, seed.clone()))
    assert not torch.equal(mask, _kernel_mask(shape, torch.float32, p, seed + 1))


def test_seed_comes_from_torch_generator_and_replays_under_checkpoint():
    """Without a seed the kernel draws from the device generator: manual_seed decides the mask,
    and torch.utils.checkpoint's RNG replay recomputes the same one (gradients agree)."""
    x, bias, residual, grad = _inputs((9, 40), torch.float32, 2)
    fn = lambda x, b, r: bias_dropout_add(x * 2, b, r, 0.5)  # noqa: E731

    torch.manual_seed(4)
    plain = fn(x, bias, residual)
    grads = torch.autograd.grad(plain, (x, bias, residual), grad)
    torch.manual_seed(4)
    assert torch.equal(fn(x, bias, residual), plain)
    torch.manual_seed(4)
    recomputed = checkpoint(fn, x, bias, residual, use_reentrant=False)
    torch.manual_seed(99)  # the replay must not depend on the generator's state at backward
    for a, b in zip(torch.autograd.grad(recomputed, (x, bias, residual), grad), grads):
        assert torch.equal(a, b)
    assert torch.equal(recomputed, plain)


def test_fp32_residual_with_half_input():
    """A half-precision branch added to an fp32 residual stream promotes, as torch does."""
    x, bias, _, _ = _inputs((5, 48), torch.float16, 3)
    residual = torch.randn(5, 48, device=DEVICE, requires_grad=True)
    y = bias_dropout_add(x, bias, residual, 0.0)
    assert y.dtype == torch.float32
    dx, dr = torch.autograd.grad(y.sum(), (x, residual))
    assert dx.dtype == torch.float16 and dr.dtype == torch.float32
    assert_close(y, bias_dropout_add_reference(x.float(), bias.float(), residual, 0.0), 1e-6, "y")


def test_argument_errors_are_named():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="bias"):
        bias_dropout_add(x, torch.zeros(4, device=DEVICE), x)
    with pytest.raises(ValueError, match="residual"):
        bias_dropout_add(x, torch.zeros(8, device=DEVICE), torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="p = 1.0"):
        bias_dropout_add(x, torch.zeros(8, device=DEVICE), x, 1.0)
