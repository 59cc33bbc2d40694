"""Gradients and global quantities over a tensor-parallel model.

Call order in a training step (after `loss.backward()` of the last micro-batch and any
data-parallel gradient reduction):

    reduce_replicated_grads(model, grid)           # copies of one tensor get the same, full gradient
    norm = clip_grad_norm_(model.parameters(), max_norm, grid)   # or grad_norm(...)
    if any_nonfinite(norm, grid): skip the step    # every rank decides the same

A parameter's description (set by `parallelize`) says how many adjacent TP ranks hold it
(`tp_copies`) and whether each copy's gradient is partial (`partial_grad`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from starcoder.parallel.grid import Grid


def tp_copies(param: torch.Tensor) -> int:
    """How many adjacent TP ranks hold exactly this tensor (1: this rank's own shard)."""
    return getattr(param, "tp_copies", 1)


def copy_group(param: torch.Tensor, grid: Grid):
    """The process group of the TP ranks that hold the same copy of `param` (None if only one)."""
    return copy_group_of(tp_copies(param), grid)


def copy_group_of(copies: int, grid: Grid):
    if copies == 1:
        return None
    if copies == grid.tp:
        return grid.group("tp")
    return grid.kv_mesh(copies).get_group("kv_copy")


def reduce_replicated_grads(model: nn.Module, grid: Grid) -> None:
    """Sum the gradients of parameters whose copies each saw part of the gradient (KV heads shared
    by several TP ranks; LayerNorms, row-parallel biases and positions under sequence parallel),
    one flat all-reduce per group. All copies end with the same, full gradient. Works on a
    `GradBuffer`'s fp32 `main_grad` when there is one (after its data-parallel reduction; with the
    distributed optimizer only each rank's own slice is then meaningful, and it is the one used)."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for param in model.parameters():
        grad = _grad(param)
        if getattr(param, "partial_grad", False) and grad is not None:
            buckets.setdefault((tp_copies(param), grad.dtype), []).append(grad)
    for (copies, _), grads in buckets.items():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=copy_group_of(copies, grid))
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)


def _grad(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient to reduce: the fp32 accumulator of a `GradBuffer` (`main_grad`), else `.grad`."""
    return getattr(param, "main_grad", param.grad)


def grad_norm(params, grid: Grid) -> torch.Tensor:
    """The global L2 norm of all gradients (fp32 scalar, the same on every rank): each shard
    counted once, each replicated tensor once (by the first rank of its copies; a tied
    embedding's last-stage copy, `pipeline_copy`, not at all), summed over the tensor- and
    pipeline-parallel groups. Data-parallel gradients must already be reduced."""
    params = [p for p in params if p.grad is not None]
    if grid.pp > 1:
        return _pipeline_grad_norm(params, grid)
    counted = [p.grad.detach().float().pow(2).sum() for p in params
               if grid.tp_rank % tp_copies(p) == 0]
    device = params[0].grad.device if params else torch.device("cpu")
    total = torch.stack(counted).sum() if counted else torch.zeros((), device=device)
    if grid.tp > 1:
        dist.all_reduce(total, group=grid.group("tp"))
    return total.sqrt()


def _pipeline_grad_norm(params, grid: Grid) -> torch.Tensor:
    """The norm over pipeline stages: each stage's per-parameter squared norms are gathered and
    summed in the whole model's parameter order (`pipeline_order`, set by the pipeline), so PP
    alone gives the single-process norm bit for bit. Under TP the per-parameter values are first
    summed over the tensor-parallel group (copies held by several TP ranks count once)."""
    if grid.tp == 1:
        params = [p for p in params if not getattr(p, "pipeline_copy", False)]
    squares = [p.grad.detach().float().pow(2).sum() for p in params]
    if grid.tp > 1:
        for i, p in enumerate(params):
            if grid.tp_rank % tp_copies(p) or getattr(p, "pipeline_copy", False):
                squares[i] = torch.zeros_like(squares[i])
        if squares:
            stacked = torch.stack(squares)
            dist.all_reduce(stacked, group=grid.group("tp"))
            squares = list(stacked.unbind())
    device = params[0].grad.device if params else torch.device("cpu")
    mine = [(p.pipeline_order, s.cpu()) for p, s in zip(params, squares)]
    stages = [None] * grid.pp
    dist.all_gather_object(stages, mine, group=grid.group("pp"))
    ordered = sorted((entry for stage in stages for entry in stage), key=lambda e: e[0])
    total = torch.stack([s for _, s in ordered]).to(device).sum() if ordered else torch.zeros((), device=device)
    return total.sqrt()


def clip_grad_norm_(params, max_norm: float, grid: Grid) -> torch.Tensor:
    """Scale all gradients so their global norm is at most `max_norm`; returns the norm before
    clipping (inf/nan when a gradient is not finite; then check `any_nonfinite` and skip)."""
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params, grid)
    if params:
        torch._foreach_mul_([p.grad for p in params], (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def any_nonfinite(value: torch.Tensor, grid: Grid) -> bool:
    """True on every rank if `value` holds inf or nan on any rank of the grid (one all-reduce
    over the world), so all ranks skip a step together."""
    flag = (~torch.isfinite(value.detach())).any().float().reshape(1)
    if grid.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
