"""The global gradient norm: one number, equal on every rank, used for clipping and for the
non-finite check (a NaN or inf anywhere makes it non-finite).

Data-parallel replicas hold the same, already reduced gradients, so each counts once. A
tensor-parallel shard (a parameter carrying `shard_slices`) holds part of a gradient: the sums
of squares of shards are added over the tensor-parallel group, while replicated parameters
(LayerNorms, biases of row-parallel layers) are counted once. Pipeline stages own disjoint
parameters, so their sums are added over the pipeline group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from starcoder.parallel.grid import Grid


def grad_norm(params: list[nn.Parameter], grid: Grid) -> torch.Tensor:
    """L2 norm of all gradients of the model (an fp32 scalar tensor on the parameters' device)."""
    sharded = [p.grad for p in params if p.grad is not None and hasattr(p, "shard_slices")]
    replicated = [p.grad for p in params if p.grad is not None and not hasattr(p, "shard_slices")]
    device = params[0].device
    squares = _sum_of_squares(replicated, device)
    if sharded:
        shard_squares = _sum_of_squares(sharded, device)
        if grid.tp > 1:
            dist.all_reduce(shard_squares, group=grid.group("tp"))
        squares = squares + shard_squares
    if grid.pp > 1:
        dist.all_reduce(squares, group=grid.group("pp"))
    return squares.sqrt()


def clip_grads(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients so that their global norm is at most `max_norm` (0 disables)."""
    if max_norm > 0:
        clip_grads_with_norm_(params, max_norm, norm)


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return get_total_norm(grads, norm_type=2.0).float() ** 2
