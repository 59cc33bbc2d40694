"""Contiguous per-bucket parameter and gradient buffers with data-parallel reduction started
from backward hooks (Megatron's `ParamAndGradBuffer`).

Each bucket holds a flat run of parameters, in reverse order of definition (roughly the order
backward produces their gradients), padded to a multiple of the data-parallel size:

- `data`: the parameters' storage (model dtype, e.g. bf16); every parameter is a view into it,
  so the updated weights are all-gathered in one call per bucket;
- `grad`: the gradient accumulator (fp32 by default, `parallel.grad_reduce_in_fp32`); each
  parameter's `main_grad` is a view into it. A post-accumulate hook adds `param.grad` into
  `main_grad` and frees `param.grad`, so micro-batches accumulate in this dtype.

When the last micro-batch's backward has produced every gradient of a bucket, its reduction is
launched asynchronously while backward goes on: an all-reduce (sum) of the whole bucket, or, with
`shard=True` (the distributed optimizer), a reduce-scatter that leaves each rank the sum of its own
1/DP slice, `bucket.shard`. On gloo the reduce-scatter is an `all_to_all_single` and a local sum:
gloo's `reduce_scatter_tensor` sends as many bytes as an all-reduce (see
../shared/reference/torch-distributed-cpu.md), an all-to-all sends what a ring reduce-scatter does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from starcoder.parallel.collectives import _all_gather_single, _reduce_scatter_single
from starcoder.parallel.grid import Grid


@dataclass(eq=False)
class Bucket:
    params: list[nn.Parameter]
    offsets: list[tuple[int, int]]  # each parameter's [start, end) in the flat buffers
    data: torch.Tensor
    grad: torch.Tensor
    shard: tuple[int, int]  # the [start, end) this rank owns (the whole bucket without sharding)
    ready: int = 0  # gradients produced in this backward
    work: object = None  # the reduction in flight
    received: torch.Tensor | None = None  # gloo reduce-scatter: every rank's copy of our slice
    gather: object = None  # the weight all-gather in flight
    launched_at: float | None = None  # time.perf_counter() of the last reduction launch

    def range_of(self, param: nn.Parameter) -> tuple[int, int]:
        """`param`'s [start, end) in the flat buffers."""
        return next(r for p, r in zip(self.params, self.offsets) if p is param)

    @property
    def numel(self) -> int:
        return self.data.numel()


@dataclass(eq=False)
class GradBuffer:
    """Build with `GradBuffer.create`. `sync` says whether this backward launches reductions
    (only the last micro-batch's does, like DDP's `no_sync`)."""

    buckets: list[Bucket]
    group: object  # the data-parallel process group (None: one replica)
    dp: int
    dp_rank: int
    shard: bool
    nccl: bool
    sync: bool = True
    weight: float = 1.0  # this rank's share of the step's tokens: gradients are weighted by it
    # before the data-parallel sum (each rank's loss is the mean over its own tokens)
    bucket_of: dict = field(default_factory=dict)  # id(param) -> bucket
    _hooks: list = field(default_factory=list)

    @classmethod
    def create(cls, params: list[nn.Parameter], grid: Grid, grad_dtype: torch.dtype,
               bucket_mb: float, shard: bool) -> "GradBuffer":
        """Move `params` into buckets of about `bucket_mb` MB of gradient (in their own dtype;
        `cast_params` changes it); `shard` reduce-scatters instead of all-reducing."""
        group = grid.group("dp") if grid.dp > 1 else None
        nccl = group is not None and dist.get_backend(group) == "nccl"
        dp = grid.dp
        cap = max(1, int(bucket_mb * 2**20 / torch.finfo(grad_dtype).bits * 8))
        runs, run, size = [], [], 0
        for p in reversed(params):
            run.append(p)
            size += p.numel()
            if size >= cap:
                runs.append(run)
                run, size = [], 0
        if run:
            runs.append(run)
        buckets = []
        for run in runs:
            offsets, n = [], 0
            for p in run:
                offsets.append((n, n + p.numel()))
                n += p.numel()
            n = -(-n // dp) * dp  # pad so every rank owns an equal slice
            device = run[0].device
            data = torch.zeros(n, dtype=run[0].dtype, device=device)
            grad = torch.zeros(n, dtype=grad_dtype, device=device)
            for p, (a, b) in zip(run, offsets):
                data[a:b].copy_(p.detach().reshape(-1))
                p.data = data[a:b].view(p.shape)
                p.main_grad = grad[a:b].view(p.shape)
            k = n // dp
            owned = (grid.dp_rank * k, (grid.dp_rank + 1) * k) if shard else (0, n)
            buckets.append(Bucket(run, offsets, data, grad, owned))
        buffer = cls(buckets, group, dp, grid.dp_rank, shard and dp > 1, nccl)
        for bucket in buckets:
            for p in bucket.params:
                buffer.bucket_of[id(p)] = bucket
                buffer._hooks.append(p.register_post_accumulate_grad_hook(buffer._accumulate))
        return buffer

    @torch.no_grad()
    def cast_params(self, dtype: torch.dtype) -> None:
        """Hold the weights in `dtype` from now on (the optimizer has taken its fp32 copies)."""
        for bucket in self.buckets:
            bucket.data = bucket.data.to(dtype)
            for p, (a, b) in zip(bucket.params, bucket.offsets):
                p.data = bucket.data[a:b].view(p.shape)

    # ----------------------------------------------------------------------------------------
    # Backward

    @torch.no_grad()
    def _accumulate(self, param: nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        bucket = self.bucket_of[id(param)]
        bucket.ready += 1
        if self.sync and bucket.ready == len(bucket.params):
            self._launch(bucket)

    @torch.no_grad()
    def fold_grads(self) -> None:
        """Add into `main_grad` any `.grad` set without autocast's accumulation (the pipeline's
        split weight backward assigns it directly, so the hook never ran)."""
        for bucket in self.buckets:
            for p in bucket.params:
                if p.grad is not None:
                    p.main_grad.add_(p.grad)
                    p.grad = None

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched_at = time.perf_counter()
        if self.group is None:
            return
        if self.weight != 1.0:
            bucket.grad.mul_(self.weight)
        if not self.shard:
            bucket.work = dist.all_reduce(bucket.grad, group=self.group, async_op=True)
        elif self.nccl:
            lo, hi = bucket.shard
            bucket.work = _reduce_scatter_single(bucket.grad[lo:hi], bucket.grad, group=self.group,
                                                 async_op=True)
        else:
            bucket.received = torch.empty_like(bucket.grad)
            bucket.work = dist.all_to_all_single(bucket.received, bucket.grad, group=self.group,
                                                 async_op=True)

    @torch.no_grad()
    def finish_grad_sync(self) -> None:
        """Wait for every bucket's reduction (launching any a backward left unlaunched, e.g. for a
        parameter that got no gradient). Afterwards `bucket.grad[shard]` holds the global sum."""
        for bucket in self.buckets:
            if bucket.work is None and bucket.launched_at is None:
                self._launch(bucket)
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
            if bucket.received is not None:
                lo, hi = bucket.shard
                torch.sum(bucket.received.view(self.dp, -1), dim=0, out=bucket.grad[lo:hi])
                bucket.received = None
            bucket.ready = 0

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.grad.zero_()
            bucket.ready, bucket.launched_at = 0, None

    # ----------------------------------------------------------------------------------------
    # Updated weights

    def start_param_gather(self) -> None:
        """All-gather each bucket's weights from the ranks that own its slices (asynchronous;
        `wait_param_gather` finishes it). Nothing to do without sharding."""
        if not self.shard:
            return
        for bucket in self.buckets:
            lo, hi = bucket.shard
            bucket.gather = _all_gather_single(bucket.data, bucket.data[lo:hi].clone(),
                                               group=self.group, async_op=True)

    def wait_param_gather(self, bucket: Bucket | None = None) -> None:
        for b in [bucket] if bucket is not None else self.buckets:
            if b.gather is not None:
                b.gather.wait()
                b.gather = None

    def gather_on_forward(self, model: nn.Module) -> None:
        """Let each module wait for its own parameters' gather just before its forward, so the
        gather of later buckets overlaps the start of the next forward
        (`parallel.overlap_param_gather`)."""
        for module in model.modules():
            mine = {id(self.bucket_of[id(p)]): self.bucket_of[id(p)]
                    for p in module.parameters(recurse=False) if id(p) in self.bucket_of}
            if mine:
                self._hooks.append(module.register_forward_pre_hook(
                    lambda _module, _args, buckets=tuple(mine.values()):
                    [self.wait_param_gather(b) for b in buckets] and None))
