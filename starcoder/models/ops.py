"""Pointwise and normalisation ops the model calls, each with a `backend` switch.

`torch` is the plain PyTorch reference that runs anywhere; `triton` routes to the hand-written
kernels in `starcoder.kernels` (imported lazily, so CPU-only installs never touch Triton); `auto`
(what `resolve_backend` keeps on CUDA) routes to them for CUDA tensors.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from starcoder.models.attention import uses_triton


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               backend: str = "torch", residual: torch.Tensor | None = None):
    """LayerNorm(x), or with `residual` (LayerNorm(x + residual), x + residual): Triton fuses the
    add into the norm's pass."""
    if uses_triton(backend, x, "layer_norm"):
        from starcoder.kernels import layer_norm as triton_layer_norm

        if residual is not None and residual.dtype != x.dtype:  # the kernel adds like dtypes
            dtype = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(dtype), residual.to(dtype)
        return triton_layer_norm(x, weight, bias, eps, residual)
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str,
              backend: str = "torch") -> torch.Tensor:
    """gelu(x + bias); `approximate` is "tanh" (as StarCoder trained) or "none" (exact)."""
    if uses_triton(backend, x, "bias_gelu") and approximate == "tanh" and bias is not None:
        from starcoder.kernels import bias_gelu as triton_bias_gelu

        return triton_bias_gelu(x, bias)
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                     dropout: nn.Dropout, backend: str = "torch") -> torch.Tensor:
    """residual + dropout(x + bias) with the caller's dropout module: its `p` and training mode
    decide, and its RNG stream (`dropout.rng_fork(device)`, which tensor parallelism's
    `TPDropout` has; a plain nn.Dropout uses the default generators). Triton: one kernel, whose
    mask seed is drawn from the device generator inside that stream."""
    if uses_triton(backend, x, "bias_dropout_add") and bias is not None:
        from starcoder.kernels import bias_dropout_add as triton_bias_dropout_add
        from starcoder.kernels import draw_seed

        p = dropout.p if dropout.training else 0.0
        seed = None
        if p > 0.0:
            with getattr(dropout, "rng_fork", contextlib.nullcontext)(x.device):
                seed = draw_seed(x.device)
        return triton_bias_dropout_add(x, bias, residual, p, seed)
    return residual + dropout(x if bias is None else x + bias)


def rotary_tables(seq_len: int, head_dim: int, theta: float,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq_len, head_dim] (fp32), rotate-half (GPT-NeoX / HF) layout."""
    # fp32 throughout, as Megatron trained and transformers evaluates these models.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    pos = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, hq, d] and k [b, s, hk, d] by position; cos/sin are [s, d], or
    [b, s, d] when each row has its own positions (decoding; PyTorch only)."""
    if uses_triton(backend, q, "rope") and cos.dim() == 2:
        from starcoder.kernels import apply_rope as triton_apply_rope

        return triton_apply_rope(q, k, cos, sin)
    return _rope(q, cos, sin), _rope(k, cos, sin)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         backend: str = "torch") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels) per token; Triton never holds all fp32 logits."""
    if uses_triton(backend, hidden, "linear_cross_entropy"):
        from starcoder.kernels import linear_cross_entropy as triton_linear_cross_entropy

        return triton_linear_cross_entropy(hidden, weight, labels)
    return cross_entropy(F.linear(hidden, weight), labels)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Per-token loss in fp32, same shape as labels; labels equal to -100 give 0."""
    if uses_triton(backend, logits, "cross_entropy"):
        from starcoder.kernels import cross_entropy as triton_cross_entropy

        return triton_cross_entropy(logits, labels)
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           reduction="none", ignore_index=-100)
    return flat.view(labels.shape)
