"""Autograd-aware collectives at the edges of tensor- and sequence-parallel regions (Megatron's
`mappings.py`), over plain `torch.distributed` so gloo and NCCL both work.

Activations are [batch, seq, hidden]. Each op's backward is the adjoint of its forward:

| op                     | forward                          | backward                         |
|------------------------|----------------------------------|----------------------------------|
| `copy_to_tp`           | identity                         | all-reduce                       |
| `reduce_from_tp`       | all-reduce                       | identity                         |
| `gather_from_tp`       | all-gather on the last dim       | keep this rank's chunk           |
| `scatter_to_tp`        | keep this rank's last-dim chunk  | all-gather on the last dim       |
| `gather_from_sp`       | all-gather on the sequence dim   | reduce-scatter on the sequence   |
| `reduce_scatter_to_sp` | reduce-scatter on the sequence   | all-gather on the sequence       |

`gather_from_sp` feeds tensor-parallel layers (each rank's gradient is a partial sum), hence the
reduce-scatter in its backward. Every op is the identity when `group` is None (one process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1

# torch 2.13 renamed the tensor collectives; older releases (2.11 on the GPU machines) lack the new
# names. Looked up at each call, so hooks on torch.distributed (`comm_accounting`) see them.
def _all_gather_single(*args, **kwargs):
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


def _reduce_scatter_single(*args, **kwargs):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order); no autograd."""
    n = _size(group)
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * front.shape[0], *front.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum `x` over ranks and keep this rank's chunk of `dim`."""
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {n} ranks")
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((front.shape[0] // n, *front.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {n} ranks")
    return x.chunk(n, dim)[dist.get_rank(group)].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return _chunk(grad, grad.dim() - 1, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _chunk(x, x.dim() - 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, grad.dim() - 1, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, SEQ_DIM, ctx.group), None


def _apply(fn, x: torch.Tensor, group) -> torch.Tensor:
    return x if _size(group) == 1 else fn.apply(x, group)


def copy_to_tp(x, group):
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x, group):
    return _apply(_ReduceFromTP, x, group)


def gather_from_tp(x, group):
    return _apply(_GatherFromTP, x, group)


def scatter_to_tp(x, group):
    return _apply(_ScatterToTP, x, group)


def gather_from_sp(x, group):
    return _apply(_GatherFromSP, x, group)


def reduce_scatter_to_sp(x, group):
    return _apply(_ReduceScatterToSP, x, group)
