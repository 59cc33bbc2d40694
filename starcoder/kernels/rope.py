"""Rotary position embedding (rotate-half, GPT-NeoX / HF layout) on q and k in one launch.

out = x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]. The backward is the same
rotation with the sine terms swapped and negated (the transpose of the rotation), so both
directions run one kernel. One program per token rotates all its q and k heads; cos/sin are
[seq, head_dim] fp32 tables, math in fp32, results in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from starcoder.kernels._triton import check_dtype, last_dim_contiguous, next_power_of_2


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    def rotate(x):
        c, s = cos[: x.shape[1], None, :], sin[: x.shape[1], None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return (x.float() * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(X, OUT, x_base, out_base, stride_h, out_stride_h, heads, cos1, cos2, s1, s2,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    x_ptrs = X + x_base + h * stride_h + d
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = OUT + out_base + h * out_stride_h + d
    tl.store(out_ptrs, (x1 * cos1 - x2 * s1).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + HALF, (x2 * cos2 + x1 * s2).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
                 stride_kh, stride_cs, seq_len, q_heads, kv_heads,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BACKWARD: tl.constexpr):
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    s = token % seq_len
    d = tl.arange(0, HALF)[None, :]
    cos1 = tl.load(COS + s * stride_cs + d)
    cos2 = tl.load(COS + s * stride_cs + HALF + d)
    sin1 = tl.load(SIN + s * stride_cs + d)
    sin2 = tl.load(SIN + s * stride_cs + HALF + d)
    if BACKWARD:  # transpose of the rotation
        s1, s2 = -sin2, -sin1
    else:
        s1, s2 = sin1, sin2
    # Outputs are contiguous [batch, seq, heads, 2 * HALF].
    _rotate_heads(Q, QO, b * stride_qb + s * stride_qs, token.to(tl.int64) * q_heads * 2 * HALF,
                  stride_qh, 2 * HALF, q_heads, cos1, cos2, s1, s2, HALF, BLOCK_HQ)
    _rotate_heads(K, KO, b * stride_kb + s * stride_ks, token.to(tl.int64) * kv_heads * 2 * HALF,
                  stride_kh, 2 * HALF, kv_heads, cos1, cos2, s1, s2, HALF, BLOCK_HK)


def _rotate(q, k, cos, sin, backward):
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    block = head_dim // 2 * next_power_of_2(max(q_heads, kv_heads))
    _rope_kernel[(batch * seq,)](q, k, q_out, k_out, cos, sin, q.stride(0), q.stride(1), q.stride(2),
                                 k.stride(0), k.stride(1), k.stride(2), cos.stride(0), seq,
                                 q_heads, kv_heads, HALF=head_dim // 2,
                                 BLOCK_HQ=next_power_of_2(q_heads), BLOCK_HK=next_power_of_2(kv_heads),
                                 BACKWARD=backward, num_warps=min(max(block // 256, 1), 8))
    return q_out, k_out


@torch.library.custom_op("starcoder::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, backward)


@_rope_op.register_fake
def _(q, k, cos, sin, backward):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward


def _backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_op(grad_q, grad_k, cos, sin, not ctx.backward)
    return dq, dk, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [b, s, hq, d] and k [b, s, hk, d]; cos, sin [>= s, d] fp32 (rotate-half layout)."""
    check_dtype("apply_rope q", q)
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"apply_rope: expected q [b, s, hq, d], k [b, s, hk, d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    seq, head_dim = q.shape[1], q.shape[3]
    if head_dim % 2 or next_power_of_2(head_dim // 2) != head_dim // 2:
        raise ValueError(f"apply_rope: head_dim {head_dim} must be twice a power of two")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] < seq or cos.shape[1] != head_dim:
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)} must be [>= {seq}, {head_dim}]")
    cos = last_dim_contiguous(cos.float())
    sin = last_dim_contiguous(sin.float())
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return _rope_op(q, k, cos, sin, False)
