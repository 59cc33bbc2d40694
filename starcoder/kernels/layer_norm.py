"""LayerNorm with bias over the last dimension, forward and backward, with an optional fused
residual add (`h = x + residual; y = LayerNorm(h)`, returning both, as pre-LN blocks want).

Forward: one program per row, statistics in fp32, mean and 1/std kept for the backward.
Backward: each program walks a strided set of rows, writes dX, and keeps its partial dW/dB sums
in fp32 registers; one small sum over programs finishes dW/dB (no atomics, deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from starcoder.kernels._triton import check_dtype, multiprocessors, next_power_of_2, rows_view


def layer_norm_reference(x, weight, bias, eps, residual=None):
    """PyTorch definition: y, or (y, x + residual) when a residual is given."""
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


@triton.jit
def _ln_fwd(X, R, H, Y, W, B, MEAN, RSTD, stride_x, stride_r, stride_h, stride_y, n, eps,
            HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Normalise the stored (rounded) sum so y matches LayerNorm(h) exactly.
        x = (x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, 0) / n
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / n + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd(DY, X, W, MEAN, RSTD, DH, DX, DW_PART, DB_PART, stride_dy, stride_x, stride_dh,
            stride_dx, rows, n, HAS_DH: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r in range(pid, rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, 0) / n
        c2 = tl.sum(wdy, 0) / n
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH:  # gradient reaching the residual sum directly
            dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * n + cols, dw, mask=mask)
    tl.store(DB_PART + pid * n + cols, db, mask=mask)


def _warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


@torch.library.custom_op("starcoder::layer_norm_forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                residual: Optional[torch.Tensor], eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd); h = x + residual, empty without a residual."""
    x2 = rows_view(x)
    rows, n = x2.shape
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else x2.new_empty(0)
    r2 = rows_view(residual) if residual is not None else x2
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_n = next_power_of_2(n)
    _ln_fwd[(rows,)](x2, r2, h, y, weight, bias, mean, rstd, x2.stride(0), r2.stride(0),
                     h.stride(0) if residual is not None else 0, y.stride(0), n, eps,
                     HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=_warps(block_n))
    return y.view(x.shape), (h.view(x.shape) if residual is not None else h), mean, rstd


@_forward_op.register_fake
def _(x, weight, bias, residual, eps):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), h, stats, torch.empty_like(stats)


@torch.library.custom_op("starcoder::layer_norm_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, grad_h: Optional[torch.Tensor], x: torch.Tensor,
                 weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); x is the normalised input (h when there was a residual)."""
    dy2, x2 = rows_view(grad_y), rows_view(x)
    rows, n = x2.shape
    dx = torch.empty_like(x2)
    dh2 = rows_view(grad_h) if grad_h is not None else dy2
    programs = max(1, min(rows, 4 * multiprocessors(x.device)))
    dw_part = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    block_n = next_power_of_2(n)
    _ln_bwd[(programs,)](dy2, x2, weight, mean, rstd, dh2, dx, dw_part, db_part, dy2.stride(0),
                         x2.stride(0), dh2.stride(0), dx.stride(0), rows, n,
                         HAS_DH=grad_h is not None, BLOCK_N=block_n, num_warps=_warps(block_n))
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


@_backward_op.register_fake
def _(grad_y, grad_h, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    y, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)


def _backward(ctx, grad_y, grad_h, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_h = grad_h if ctx.has_residual else None
    dx, dw, db = _backward_op(grad_y, grad_h, x, weight, mean, rstd)
    return dx, dw, db, (dx if ctx.has_residual else None), None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None):
    """LayerNorm(x) over the last dim; with `residual`, returns (LayerNorm(x + residual), x + residual)."""
    check_dtype("layer_norm x", x)
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"layer_norm: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} "
                         f"must be ({n},)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"layer_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype}")
    if n > 65536:
        raise ValueError(f"layer_norm: hidden size {n} above the 65536 one row per program holds")
    y, h, _, _ = _forward_op(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, h)
