"""Shards as DTensors, for `torch.distributed.checkpoint` (DCP).

DCP records where each shard lies in the global tensor only for DTensors; plain tensors saved under
one key on several ranks count as replicated and one copy silently wins. `to_dtensor` wraps a
parameter's local tensor (or an optimizer state of the same shape) with the placement its
description implies, over the ("dp", tensor) part of this pipeline stage's mesh:

| parameter                           | mesh dims              | placements                          |
|-------------------------------------|------------------------|-------------------------------------|
| split over all TP ranks             | dp, tp                 | Replicate, Shard(d)                 |
| whole on every TP rank              | dp, tp                 | Replicate, Replicate                |
| KV heads shared by blocks of ranks  | dp, kv, kv_copy        | Replicate, Shard(0), Replicate      |

Local shards are equal `torch.chunk` pieces, as DCP requires.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from starcoder.parallel.grads import tp_copies
from starcoder.parallel.grid import Grid


def sharded_dim(param: torch.Tensor) -> int | None:
    """The dimension `param.shard_slices` cuts (None when it holds the whole tensor)."""
    full = getattr(param, "full_shape", param.shape)
    for dim, (s, size) in enumerate(zip(getattr(param, "shard_slices", ()), full)):
        if s.indices(size)[:2] != (0, size):
            return dim
    return None


def to_dtensor(local: torch.Tensor, param: torch.Tensor, grid: Grid) -> DTensor:
    """`local` (the parameter itself or a state shaped like it) as a DTensor aliasing its memory,
    so `dcp.load` writes into it in place. Needs a distributed grid."""
    if grid.mesh is None:
        raise ValueError("to_dtensor needs a distributed grid; save plain tensors in one process")
    dim, copies = sharded_dim(param), tp_copies(param)
    shard = Replicate() if dim is None else Shard(dim)
    if 1 < copies < grid.tp:
        mesh, placements = grid.kv_mesh(copies)["dp", "kv", "kv_copy"], (Replicate(), shard, Replicate())
    else:
        mesh, placements = grid.mesh["dp", "tp"], (Replicate(), shard)
    shape = torch.Size(getattr(param, "full_shape", param.shape))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)
