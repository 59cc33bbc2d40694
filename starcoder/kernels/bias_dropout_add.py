"""residual + dropout(x + bias), forward and backward (Megatron's fused bias-dropout-add).

One pass instead of three: the forward reads x and the residual once and writes the sum. The
dropout mask is never stored: it is Philox randomness (`tl.rand`) of a seed and each element's
index in the [rows, n] view, so the backward regenerates it from the same seed. The seed is an
int64 tensor of one element drawn from torch's generator on x's device (`torch.randint`), so
`torch.manual_seed`, RNG forks (tensor-parallel dropout) and the RNG replay of activation
recomputation decide the mask as they do for `nn.Dropout`. Nothing of size [rows, n] is saved
for the backward: d residual is the incoming gradient itself, dx = mask * grad / (1 - p), and each
row-tile's partial bias gradient is written in fp32 and summed afterwards (no atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from starcoder.kernels._triton import (AUTOTUNE, ROW_TILE_CONFIGS, check_dtype, row_tile_grid,
                                       row_tile_options, rows_view)


def bias_dropout_add_reference(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                               p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch definition; `mask` (bool, like x) replaces F.dropout's own draw, so the reference
    can use the kernel's mask."""
    if mask is None:
        return residual + F.dropout(x + bias, p, training=p > 0.0)
    return residual + torch.where(mask, (x + bias) / (1.0 - p), 0.0)


def draw_seed(device: torch.device) -> torch.Tensor:
    """One Philox seed from the default generator of `device` (no host sync on a GPU)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


@triton.jit
def _keep(SEED, r64, c, n, p):
    """The dropout mask of tile (rows r64, columns c): element (r, c) is kept when its uniform
    draw at offset r * n + c is at least p."""
    offsets = r64[:, None] * n + c[None, :]
    return tl.rand(tl.load(SEED), offsets) >= p


@triton.jit
def _bda_fwd(X, BIAS, R, Y, SEED, stride_x, stride_r, stride_y, rows, n, p, scale,
             DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < n)
    r64 = r.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    z = x + tl.load(BIAS + c, mask=c < n, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        z = tl.where(_keep(SEED, r64, c, n, p), z * scale, 0.0)
    res = tl.load(R + r64[:, None] * stride_r + c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + r64[:, None] * stride_y + c[None, :], (res + z).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bda_bwd(DY, SEED, DX, DB_PART, stride_dy, stride_dx, rows, n, p, scale,
             DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < n)
    r64 = r.to(tl.int64)
    dx = tl.load(DY + r64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        dx = tl.where(_keep(SEED, r64, c, n, p), dx * scale, 0.0)
    tl.store(DX + r64[:, None] * stride_dx + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DB_PART + tl.program_id(0) * n + c, tl.sum(dx, 0), mask=c < n)


_tuned_fwd = triton.autotune(ROW_TILE_CONFIGS, key=["n", "DROPOUT"])(_bda_fwd) if AUTOTUNE else None


def _out_dtype(x, bias, residual) -> torch.dtype:
    """What `residual + (x + bias)` promotes to (an fp32 residual stream with bf16 x stays fp32)."""
    return torch.promote_types(torch.promote_types(x.dtype, bias.dtype), residual.dtype)


def _scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p > 0.0 else 1.0


@torch.library.custom_op("starcoder::bias_dropout_add_forward", mutates_args=())
def _forward_op(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, seed: torch.Tensor,
                p: float) -> torch.Tensor:
    x2, r2 = rows_view(x), rows_view(residual)
    rows, n = x2.shape
    y = torch.empty(x2.shape, dtype=_out_dtype(x, bias, residual), device=x.device)
    args = (x2, bias, r2, y, seed, x2.stride(0), r2.stride(0), y.stride(0), rows, n, p, _scale(p))
    if _tuned_fwd is not None:
        _tuned_fwd[row_tile_grid(rows, n)](*args, DROPOUT=p > 0.0)
    else:
        _bda_fwd[row_tile_grid(rows, n)](*args, DROPOUT=p > 0.0, **row_tile_options(False))
    return y.view(x.shape)


@_forward_op.register_fake
def _(x, bias, residual, seed, p):
    return torch.empty_like(x, dtype=_out_dtype(x, bias, residual))


@torch.library.custom_op("starcoder::bias_dropout_add_backward", mutates_args=())
def _backward_op(grad_y: torch.Tensor, seed: torch.Tensor, p: float, x_dtype: torch.dtype,
                 bias_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dbias) from the regenerated mask; d residual is grad_y itself."""
    dy2 = rows_view(grad_y)
    rows, n = dy2.shape
    options = row_tile_options(True)
    dx = torch.empty(dy2.shape, dtype=x_dtype, device=grad_y.device)
    db_part = torch.empty(triton.cdiv(rows, options["BLOCK_R"]), n, dtype=torch.float32,
                          device=grad_y.device)
    _bda_bwd[row_tile_grid(rows, n)](dy2, seed, dx, db_part, dy2.stride(0), dx.stride(0), rows, n,
                                     p, _scale(p), DROPOUT=p > 0.0, **options)
    return dx.view(grad_y.shape), db_part.sum(0).to(bias_dtype)


@_backward_op.register_fake
def _(grad_y, seed, p, x_dtype, bias_dtype):
    return (torch.empty_like(grad_y, dtype=x_dtype),
            grad_y.new_empty(grad_y.shape[-1], dtype=bias_dtype))


def _setup_context(ctx, inputs, output):
    x, bias, residual, seed, p = inputs
    ctx.p, ctx.dtypes = p, (x.dtype, bias.dtype, residual.dtype)
    ctx.save_for_backward(seed)


def _backward(ctx, grad_y):
    (seed,) = ctx.saved_tensors
    x_dtype, bias_dtype, residual_dtype = ctx.dtypes
    dx, dbias = _backward_op(grad_y, seed, ctx.p, x_dtype, bias_dtype)
    return dx, dbias, grad_y.to(residual_dtype), None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float = 0.0,
                     seed: torch.Tensor | None = None) -> torch.Tensor:
    """residual + dropout(x + bias, p); bias [hidden] broadcast over the rows of x [..., hidden],
    in the dtype `residual + x + bias` promotes to.

    `p` is the drop probability (0: no dropout, e.g. evaluation). `seed`: int64 [1] on x's device
    (`draw_seed`); None draws one now from the device's default generator. The same seed gives the
    same mask.
    """
    check_dtype("bias_dropout_add x", x)
    if bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_dropout_add: bias {tuple(bias.shape)} must be ({x.shape[-1]},)")
    check_dtype("bias_dropout_add residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"bias_dropout_add: residual {tuple(residual.shape)} must match x "
                         f"{tuple(x.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"bias_dropout_add: p = {p} must be in [0, 1)")
    if seed is None:  # without dropout the kernel never reads it: draw nothing
        seed = draw_seed(x.device) if p > 0.0 else x.new_zeros(1, dtype=torch.int64)
    return _forward_op(x, bias.contiguous(), residual, seed, float(p))
