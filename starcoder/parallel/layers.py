"""Megatron-style sharded layers with the interfaces of the dense ones in `starcoder.models.gpt`.

Each is built from its dense counterpart (`from_dense`), keeping its slice of the dense values, so
`parallelize` can shard a model built on any device (including `meta`). Sharded parameters carry
`full_shape` and `shard_slices` (see `starcoder.models.init`); parameters held whole by several TP
ranks carry `tp_copies` (how many adjacent TP ranks hold the same tensor) and, where each copy's
gradient is only part of the true one, `partial_grad = True`
(see `starcoder.parallel.grads.reduce_replicated_grads`).

With sequence parallel the layers read and write [batch, seq / tp, hidden] and gather or
reduce-scatter the sequence themselves; otherwise [batch, seq, hidden] replicated on the TP ranks.

Sequence-parallel column-parallel linears save their local [batch, seq / tp, hidden] input shard,
not the gathered input, and gather it again in backward for the weight gradient (Megatron's
`LinearWithGradAccumulationAndAsyncCommunication`). Linears reading one gathered input (q_proj and
kv_proj) share its forward gather, its one backward gather (`SharedGather`) and the reduce-scatter
of their summed input gradients. The input gradient and the weight gradient are separate autograd
nodes, joined by a node that only hands the output gradient to both (`_linear_saving_shard`): the
zero-bubble schedules' weight pass (`torch.distributed.pipelining._backward.stage_backward_weight`)
re-runs the node where a weight's path leaves the input path, which is then that trivial node, so
neither the input gradient nor the gather runs twice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from starcoder.parallel.collectives import (SEQ_DIM, all_gather, copy_to_tp, gather_from_sp,
                                            gather_from_tp, reduce_from_tp, reduce_scatter_to_sp)
from starcoder.parallel.cross_entropy import vocab_parallel_cross_entropy
from starcoder.parallel.grid import Grid


def shard_parameter(param: nn.Parameter, slices: tuple[slice, ...], copies: int = 1) -> nn.Parameter:
    """A new parameter holding `param[slices]`, described by `full_shape` and `shard_slices`;
    `copies` adjacent TP ranks hold the same slice."""
    shard = nn.Parameter(param.detach()[slices].clone(), requires_grad=param.requires_grad)
    shard.full_shape = tuple(param.shape)
    shard.shard_slices = tuple(slices)
    if copies > 1:
        shard.tp_copies = copies
    return shard


def mark_replicated(param: nn.Parameter, grid: Grid, partial_grad: bool) -> None:
    """`param` is held whole by every TP rank; `partial_grad` when each rank sees only part of its
    gradient (a sequence-parallel region)."""
    param.tp_copies = grid.tp
    if partial_grad:
        param.partial_grad = True


def input_to_tp(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Enter a tensor-parallel region: gather the sequence (sequence parallel) or copy. Under
    autocast the input is cast once here, so the projections reading it share one cast (and, with
    sequence parallel, the gather moves the cast bytes). A gathered input carries its local shard
    as `sequence_shard` for the column-parallel linears to save instead."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    if grid.sequence_parallel:
        full = gather_from_sp(x, grid.group("tp"))
        full.sequence_shard = SequenceShard(x, SharedGather(grid.group("tp")))
        return full
    return copy_to_tp(x, grid.group("tp"))


class SharedGather:
    """The backward all-gather of one saved input shard, shared by the linears that read the
    gathered input: the first reader in a backward gathers, the last drops the result (a later
    backward gathers again). Holds no tensor between backwards, so recomputation and saved-tensor
    hooks still decide what the shard costs."""

    def __init__(self, group):
        self.group = group
        self.readers = 0  # weight-gradient nodes saving the shard
        self._served = 0
        self._full: torch.Tensor | None = None

    def __call__(self, shard: torch.Tensor) -> torch.Tensor:
        if self._full is None:
            self._full = all_gather(shard, SEQ_DIM, self.group)
        full = self._full
        self._served += 1
        if self._served % self.readers == 0:
            self._full = None
        return full


class SequenceShard(NamedTuple):
    """What a sequence-parallel gathered input carries (`sequence_shard`): its local shard, which
    the linears reading it save instead, and their shared backward gather."""
    tensor: torch.Tensor
    gather: SharedGather


class _InputGrad(torch.autograd.Function):
    """y = x W^T + b on the gathered input, saving only W (detached: the weight gradient is
    `_WeightGrad`'s); backward: dy W."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, = ctx.saved_tensors
        dx = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None


class _WeightGrad(torch.autograd.Function):
    """Stands for W and b in the graph: saves the input shard and returns a zero-stride
    placeholder shaped like y; backward gathers the shard (`SharedGather`) and returns
    dW = dy^T x and db = sum dy."""

    @staticmethod
    def forward(ctx, shard, gather, shape, weight, bias):
        ctx.save_for_backward(shard)
        ctx.gather = gather
        gather.readers += 1
        return shard.new_zeros(()).expand(shape)  # in the compute dtype, as dy will be

    @staticmethod
    def backward(ctx, grad):
        shard, = ctx.saved_tensors
        x = ctx.gather(shard)
        _, _, _, need_weight, need_bias = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        dw = grad.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype) if need_weight else None
        db = grad.sum(0) if need_bias else None
        return None, None, None, dw, db


class _Fanout(torch.autograd.Function):
    """Returns y; backward hands dy to the input-gradient and the weight-gradient node. The
    zero-bubble weight pass re-runs this node only (see the module docstring)."""

    @staticmethod
    def forward(ctx, y, placeholder):
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


def _linear_saving_shard(x: torch.Tensor, shard: SequenceShard, weight: nn.Parameter,
                         bias: nn.Parameter | None) -> torch.Tensor:
    """F.linear(x, weight, bias) on a gathered input that saves `shard` instead of `x`."""
    y = _InputGrad.apply(x, weight.detach(), None if bias is None else bias.detach())
    trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not (trained and torch.is_grad_enabled()):
        return y  # no weight gradient: nothing to save
    placeholder = _WeightGrad.apply(shard.tensor.detach(), shard.gather, y.shape, weight, bias)
    return _Fanout.apply(y, placeholder)


def output_from_tp(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Leave a tensor-parallel region: reduce-scatter the sequence (sequence parallel) or reduce."""
    if grid.sequence_parallel:
        return reduce_scatter_to_sp(x, grid.group("tp"))
    return reduce_from_tp(x, grid.group("tp"))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W and b split by output rows; the output stays split (feeds a
    row-parallel layer or per-rank attention heads). `enter_region=False` when the caller has
    already gathered/copied the input (several projections of one input share one gather)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, grid: Grid,
                 enter_region: bool = True):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.grid, self.enter_region = grid, enter_region

    @classmethod
    def from_dense(cls, dense: nn.Linear, grid: Grid, rows: slice | None = None, copies: int = 1,
                   enter_region: bool = True) -> "ColumnParallelLinear":
        """Keep `rows` of the dense layer (default: this TP rank's equal share)."""
        if rows is None:
            rows = _equal_share(dense.out_features, grid)
        weight = shard_parameter(dense.weight, (rows, slice(None)), copies)
        bias = None if dense.bias is None else shard_parameter(dense.bias, (rows,), copies)
        return cls(weight, bias, grid, enter_region)

    def forward(self, x: torch.Tensor, return_bias: bool = False):
        if self.enter_region:
            x = input_to_tp(x, self.grid)
        bias = None if return_bias else self.bias
        shard = getattr(x, "sequence_shard", None)
        if shard is None:
            y = F.linear(x, self.weight, bias)
        else:
            y = _linear_saving_shard(x, shard, self.weight, bias)
        return (y, self.bias) if return_bias else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: each rank multiplies its part of the input and
    the partial sums are reduced (or reduce-scattered along the sequence); the bias is replicated
    and added once, after the reduction."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, grid: Grid):
        super().__init__()
        self.weight, self.bias, self.grid = weight, bias, grid

    @classmethod
    def from_dense(cls, dense: nn.Linear, grid: Grid) -> "RowParallelLinear":
        weight = shard_parameter(dense.weight, (slice(None), _equal_share(dense.in_features, grid)))
        if dense.bias is not None:
            mark_replicated(dense.bias, grid, partial_grad=grid.sequence_parallel)
        return cls(weight, dense.bias, grid)

    def forward(self, x: torch.Tensor, return_bias: bool = False):
        y = output_from_tp(F.linear(x, self.weight), self.grid)
        if return_bias:
            return y, self.bias
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with vocabulary rows split over TP ranks: each rank looks up the ids it owns,
    zeros elsewhere, and the partial embeddings are summed (reduce-scattered along the sequence
    under sequence parallel)."""

    def __init__(self, weight: nn.Parameter, grid: Grid):
        super().__init__()
        self.weight, self.grid = weight, grid
        self.start = weight.shard_slices[0].start

    @classmethod
    def from_dense(cls, dense: nn.Embedding, grid: Grid) -> "VocabParallelEmbedding":
        rows = _equal_share(dense.num_embeddings, grid)
        return cls(shard_parameter(dense.weight, (rows, slice(None))), grid)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return output_from_tp(x, self.grid)


class ParallelEmbedding(nn.Module):
    """Replaces `gpt.Embedding` (same children: `word`, `position`, `dropout`): the vocabulary-
    parallel word embedding plus this rank's rows of the replicated position table."""

    def __init__(self, word: VocabParallelEmbedding, position: nn.Embedding | None,
                 dropout: nn.Module, grid: Grid):
        super().__init__()
        self.word, self.position, self.dropout, self.grid = word, position, dropout, grid

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`positions` [batch, seq] for the whole sequence (decoding, packed documents)."""
        x = self.word(input_ids)  # [batch, seq / tp, hidden] under sequence parallel
        if self.position is not None:
            start = self.grid.tp_rank * x.shape[1] if self.grid.sequence_parallel else 0
            if positions is None:
                x = x + self.position.weight[start: start + x.shape[1]]
            else:  # this rank's part of the sequence
                x = x + self.position(positions[:, start: start + x.shape[1]])
        return self.dropout(x)


class VocabParallelOutputLayer(nn.Module):
    """Replaces `gpt.OutputLayer` with the same `forward(h, weight, labels=None)`; `weight` is this
    rank's vocabulary rows (the embedding's shard when tied). Without labels: logits over the real
    vocabulary, gathered. With labels: per-token fp32 losses from the vocabulary-parallel
    cross-entropy; full logits never exist. `backend` is the model's kernels (`GPT.set_kernels`):
    Triton computes the loss with the shard kernels and writes the gradient into the logits."""

    def __init__(self, weight: nn.Parameter | None, vocab_size: int, grid: Grid,
                 backend: str = "torch"):
        super().__init__()
        self.weight, self.vocab_size, self.grid, self.backend = weight, vocab_size, grid, backend

    @classmethod
    def from_dense(cls, dense: nn.Module, grid: Grid) -> "VocabParallelOutputLayer":
        weight = dense.weight
        if weight is not None:
            weight = shard_parameter(weight, (_equal_share(weight.shape[0], grid), slice(None)))
        return cls(weight, dense.vocab_size, grid, dense.backend)

    def forward(self, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None):
        logits = F.linear(input_to_tp(h, self.grid), weight)
        start = self.grid.tp_rank * weight.shape[0]
        if labels is None:
            return gather_from_tp(logits, self.grid.group("tp"))[..., : self.vocab_size]
        # The logits are this layer's own and F.linear does not save them: the backward may
        # overwrite them with their gradient.
        return vocab_parallel_cross_entropy(logits, labels, start, self.vocab_size,
                                            self.grid.group("tp"), self.backend,
                                            inplace_backward=True)


def _equal_share(size: int, grid: Grid) -> slice:
    if size % grid.tp:
        raise ValueError(f"{size} rows do not split over tensor parallel {grid.tp}")
    n = size // grid.tp
    return slice(grid.tp_rank * n, (grid.tp_rank + 1) * n)
