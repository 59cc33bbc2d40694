"""gelu_tanh(x + bias), forward and backward (Megatron's fused bias-GeLU, as StarCoder trained).

The tanh form is written through the sigmoid, 0.5 * (1 + tanh(u)) = sigmoid(2u), which is exact and
stable in fp32. Tiles are [rows, columns]; the backward writes dX and each row-tile's partial bias
gradient in fp32, summed afterwards (no atomics, no second pass over dX).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from starcoder.kernels._triton import (AUTOTUNE, ROW_TILE_CONFIGS, check_dtype, row_tile_grid,
                                       row_tile_options, rows_view)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias, approximate="tanh")


@triton.jit
def _gelu_parts(z):
    """sigmoid(2u) and d(2u)/dz for u = sqrt(2/pi) * (z + 0.044715 z^3)."""
    u2 = 2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)
    du2 = 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    # sigmoid is exactly 0 or 1 in fp32 beyond +-80; clamping keeps exp() finite everywhere.
    return tl.sigmoid(tl.minimum(tl.maximum(u2, -80.0), 80.0)), du2


@triton.jit
def _bias_gelu_fwd(X, BIAS, Y, stride_x, stride_y, rows, n,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < n)
    r64 = r.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    z = x + tl.load(BIAS + c, mask=c < n, other=0.0).to(tl.float32)[None, :]
    s, _ = _gelu_parts(z)
    tl.store(Y + r64[:, None] * stride_y + c[None, :], (z * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(DY, X, BIAS, DX, DB_PART, stride_dy, stride_x, stride_dx, rows, n,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < n)
    r64 = r.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
    z = x + tl.load(BIAS + c, mask=c < n, other=0.0).to(tl.float32)[None, :]
    s, du2 = _gelu_parts(z)
    dx = tl.where(mask, dy * (s + z * s * (1.0 - s) * du2), 0.0)
    tl.store(DX + r64[:, None] * stride_dx + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DB_PART + tl.program_id(0) * n + c, tl.sum(dx, 0), mask=c < n)


_tuned_fwd = triton.autotune(ROW_TILE_CONFIGS, key=["n"])(_bias_gelu_fwd) if AUTOTUNE else None


@torch.library.custom_op("starcoder::bias_gelu_forward", mutates_args=())
def _forward_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x2 = rows_view(x)
    rows, n = x2.shape
    y = torch.empty_like(x2)
    args = (x2, bias, y, x2.stride(0), y.stride(0), rows, n)
    if _tuned_fwd is not None:
        _tuned_fwd[row_tile_grid(rows, n)](*args)
    else:
        _bias_gelu_fwd[row_tile_grid(rows, n)](*args, **row_tile_options(False))
    return y.view(x.shape)


@_forward_op.register_fake
def _(x, bias):
    return torch.empty_like(x)


@torch.library.custom_op("starcoder::bias_gelu_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    dy2, x2 = rows_view(grad_y), rows_view(x)
    rows, n = x2.shape
    options = row_tile_options(True)
    dx = torch.empty_like(x2)
    db_part = torch.empty(triton.cdiv(rows, options["BLOCK_R"]), n, dtype=torch.float32,
                          device=x.device)
    _bias_gelu_bwd[row_tile_grid(rows, n)](dy2, x2, bias, dx, db_part, dy2.stride(0),
                                           x2.stride(0), dx.stride(0), rows, n, **options)
    return dx.view(x.shape), db_part.sum(0).to(bias.dtype)


@_backward_op.register_fake
def _(grad_y, x, bias):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    return _backward_op(grad_y, x, bias)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias, approximate="tanh"); bias [hidden] broadcast over the rows of x [..., hidden]."""
    check_dtype("bias_gelu x", x)
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias {tuple(bias.shape)} must be ({x.shape[-1]},)")
    return _forward_op(x, bias.contiguous())
