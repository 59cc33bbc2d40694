"""Cross-entropy over vocabulary-sharded logits that never gathers the full logits.

Each rank holds the logits of vocabulary rows [start, start + n) and reduces them to three numbers
per token: its row max m_r, its sum of exponentials s_r = sum exp(z - m_r) and the target logit (0
if the target lives elsewhere). Two all-reduces combine them: M = max_r m_r, then
S = sum_r s_r * exp(m_r - M) and the target, so lse = M + log S and loss = lse - target. The
backward needs only lse: d loss / dz = softmax(z) - onehot = exp(z - lse) - onehot.

Rows at or above `vocab_size` are padding and are left out, so the loss does not depend on the
padded size (and hence on the tensor-parallel size). All arithmetic is fp32.

One autograd Function owns the all-reduces; the per-shard pieces come from one of two backends:
the PyTorch ones here (`shard_statistics`, `shard_grad`, fp32 temporaries of the shard's size) or,
when the model's kernels are Triton, `starcoder.kernels`' shard kernels, which read the logits in
their own dtype and can write the gradient into the logits' storage (no [tokens, V/tp] buffer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from starcoder.models.attention import uses_triton

IGNORE_INDEX = -100


def shard_statistics(logits: torch.Tensor, labels: torch.Tensor, start: int, real: int):
    """Row max, sum of exp(z - row max) and target logit over this shard's `real` columns
    (the shard covers vocabulary ids [start, start + real); the rest of it is padding)."""
    z = logits[..., :real].float()
    if real == 0:  # a shard of padding only
        zeros = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
        return torch.full_like(zeros, float("-inf")), zeros, zeros
    row_max = z.amax(dim=-1)
    sum_exp = torch.exp(z - row_max.unsqueeze(-1)).sum(dim=-1)
    local, here = _local_labels(labels, start, real)
    target = torch.where(here, z.gather(-1, local.unsqueeze(-1)).squeeze(-1), 0.0)
    return row_max, sum_exp, target


def shard_grad(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
               start: int, real: int) -> torch.Tensor:
    """(softmax - onehot) * grad on this shard, zero on padding columns and ignored tokens."""
    grad = torch.where(labels == IGNORE_INDEX, 0.0, grad.float())
    out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    if real > 0:
        z = logits[..., :real].float()
        out[..., :real] = torch.exp(z - lse.unsqueeze(-1)) * grad.unsqueeze(-1)
        local, here = _local_labels(labels, start, real)
        out[..., :real].scatter_add_(-1, local.unsqueeze(-1), -(grad * here).unsqueeze(-1))
    return out.to(logits.dtype)


def _local_labels(labels: torch.Tensor, start: int, real: int):
    here = (labels >= start) & (labels < start + real)
    return torch.where(here, labels - start, 0), here


def _triton_statistics(logits, labels, start, real):
    from starcoder.kernels import cross_entropy_shard_stats

    stats = cross_entropy_shard_stats(logits[..., :real], labels, start)
    return tuple(t.view(labels.shape) for t in stats)


def _triton_grad(logits, labels, lse, grad, start, real, inplace):
    from starcoder.kernels import cross_entropy_shard_backward

    if not inplace:
        out = torch.zeros_like(logits)
        out[..., :real] = cross_entropy_shard_backward(logits[..., :real], labels, lse, grad, start)
        return out
    cross_entropy_shard_backward(logits[..., :real], labels, lse, grad, start, inplace=True)
    logits[..., real:] = 0.0  # padding columns
    return logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, start, vocab_size, group, triton, inplace_backward):
        real = max(0, min(logits.shape[-1], vocab_size - start))
        triton = triton and real > 0  # a shard of padding only needs no kernel
        statistics = _triton_statistics if triton else shard_statistics
        row_max, sum_exp, target = statistics(logits, labels, start, real)
        global_max = row_max.clone()
        if group is not None:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # exp(-inf - M) is 0 for a padding-only shard, as its sum_exp is.
        sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target])
        if group is not None:
            dist.all_reduce(sums, group=group)
        lse = global_max + torch.log(sums[0])
        loss = torch.where(labels == IGNORE_INDEX, 0.0, lse - sums[1])
        ctx.save_for_backward(logits, labels, lse)
        ctx.start, ctx.real, ctx.triton, ctx.inplace = start, real, triton, inplace_backward
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        if ctx.triton:
            grad_logits = _triton_grad(logits, labels, lse, grad, ctx.start, ctx.real, ctx.inplace)
        else:
            grad_logits = shard_grad(logits, labels, lse, grad, ctx.start, ctx.real)
        return grad_logits, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, start: int,
                                 vocab_size: int, group=None, backend: str = "torch",
                                 inplace_backward: bool = False) -> torch.Tensor:
    """Per-token fp32 loss [batch, seq] from this rank's logits [batch, seq, n] of vocabulary rows
    [start, start + n); labels are global ids (-100: ignored, loss 0). Collective over `group`.

    `backend` as the model's kernels (`uses_triton` picks the shard kernels). `inplace_backward`
    (Triton): the gradient is written into the logits' storage, for a caller that owns the logits
    and never reads them after the loss (autograd's version check catches one that does)."""
    return _VocabParallelCrossEntropy.apply(logits, labels, start, vocab_size, group,
                                            uses_triton(backend, logits), inplace_backward)
