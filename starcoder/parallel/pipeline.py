"""Pipeline parallelism over `torch.distributed.pipelining`: the stage split, the stage module and
the schedule, kept apart from the model like `parallelize`.

`parallel.pipeline_parallel: P` and `parallel.virtual_pipeline: V` cut the model into P x V stages
(blocks split evenly or as `parallel.pipeline_layers`); stage 0 owns the embedding, the last stage
the final norm, the output layer and the loss. Pipeline rank r holds stages r, r + P, ... (looped,
Megatron's interleaving), or r and 2P - 1 - r for the zero-bubble V schedule.

Each rank keeps one `GPT` holding only its stages' parts (`split_model`), so parameter names stay
global (`blocks.7.attn...`): checkpoints, the optimizer and the gradient helpers see an ordinary
model, and a checkpoint of any layout loads at any other. `StageModule`s are views of it that
`PipelineStage` runs.

Tied embeddings: the last stage keeps its own copy of the word embedding (`pipeline_copy`), whose
gradient is summed with the first stage's over the embedding group (`reduce_tied_grads`, as
Megatron's embedding group does), so the copies stay bit-identical; the gradient norm counts the
tensor once.

The trainer divides the loss by the global token count itself, so schedules are built with
`scale_grads=False` (the default divides gradients by the micro-batch count once more).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                                          ScheduleZBVZeroBubble)

from starcoder.config import ConfigError, ParallelConfig
from starcoder.models.gpt import GPT
from starcoder.models.recompute import run_blocks
from starcoder.parallel.grid import Grid


def schedule_name(parallel: ParallelConfig) -> str:
    """`parallel.pipeline_schedule` with `auto` resolved."""
    if parallel.pipeline_schedule == "auto":
        return "interleaved" if parallel.virtual_pipeline > 1 else "1f1b"
    return parallel.pipeline_schedule


def stage_layers(parallel: ParallelConfig, num_layers: int) -> list[range]:
    """Global block indices of each of the P x V stages, in pipeline order."""
    stages = parallel.pipeline_parallel * parallel.virtual_pipeline
    counts = parallel.pipeline_layers or [num_layers // stages] * stages
    starts = [sum(counts[:i]) for i in range(stages)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


def rank_stages(parallel: ParallelConfig, pp_rank: int) -> list[int]:
    """The stages pipeline rank `pp_rank` holds: looped, or V-shaped for ZB-V."""
    pp, v = parallel.pipeline_parallel, parallel.virtual_pipeline
    if schedule_name(parallel) == "zero_bubble" and v == 2:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(v)]


def split_model(model: GPT, parallel: ParallelConfig, pp_rank: int) -> GPT:
    """Drop from `model` (in place, e.g. on the meta device before `materialize`) every part that
    none of this rank's stages owns. With tied embeddings the last stage keeps the word embedding
    as its output layer's weight, marked `pipeline_copy`."""
    layers = stage_layers(parallel, model.cfg.num_layers)
    mine = rank_stages(parallel, pp_rank)
    owned = {str(i) for s in mine for i in layers[s]}
    first, last = 0 in mine, len(layers) - 1 in mine
    for name in [n for n in model.blocks if n not in owned]:
        del model.blocks[name]
    if not last:
        model.final_norm = None
        model.head = None
    if not first:
        if last and model.cfg.tie_word_embeddings:
            model.embedding.position = None
            model.embedding.word.weight.pipeline_copy = True
        else:
            model.embedding = None
    return model


class StageModule(nn.Module):
    """One pipeline stage: a view of the rank's `GPT` (shared modules, global names). Stage 0
    takes token ids; the last returns the final-normed hidden states (the loss function applies
    the output layer, `PipelineLoss`); the others map hidden states to hidden states."""

    def __init__(self, model: GPT, layers: range, first: bool, last: bool, grid: Grid):
        super().__init__()
        self.embedding = model.embedding if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[str(i)] for i in layers})
        self.final_norm = model.final_norm if last else None
        # The loss function applies the output layer; its weight (the word embedding, when tied)
        # must be among the stage's parameters, which the zero-bubble schedules' deferred
        # weight-gradient pass walks.
        self.head = model.head if last else None
        self.output_embedding = model.embedding.word if last and not first and model.cfg.tie_word_embeddings else None
        self._model = (model,)  # for the rotary tables; a tuple so it is not a submodule
        self.seq_split = grid.tp if grid.sequence_parallel else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        if self.embedding is not None:
            seq_len = x.shape[1]
            x = self.embedding(x)
        else:  # hidden states: [batch, seq / tp, hidden] under sequence parallel
            seq_len = x.shape[1] * self.seq_split
        rope = model._rope(seq_len, x.device)
        x = run_blocks(self.blocks, x, rope, model.cfg, model.training)  # this stage's chunk
        return self.final_norm(x) if self.final_norm is not None else x


class PipelineLoss:
    """The last stage's loss function: sum of token losses (labels of -100 count 0) times
    `scale` (1 / global token count, times the fp16 loss scale). Keeps each call's unscaled sum
    in `sums` for the logged loss; the schedule's first step also calls it once to infer shapes
    (on throw-away tensors), so a step's micro-batches are the last `n_microbatches` calls."""

    def __init__(self, model: GPT):
        self.model, self.scale, self.sums = model, 1.0, []

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = self.model.head(hidden, self.model.output_weight(), labels)
        summed = losses.sum()
        self.sums.append(summed.detach())
        return summed * self.scale


class Pipeline:
    """This rank's stages and the schedule over them. `step(inputs, labels)` runs forward and
    backward over all micro-batches (inputs are used on the rank holding stage 0, labels on the
    one holding the last stage) and returns the sum of token losses (zero where the last stage is
    not held); `evaluate` runs forward only."""

    def __init__(self, model: GPT, parallel: ParallelConfig, grid: Grid, n_microbatches: int,
                 device: torch.device):
        self.model, self.grid = model, grid
        layers = stage_layers(parallel, model.cfg.num_layers)
        self.stage_ids = rank_stages(parallel, grid.pp_rank)
        n_stages = len(layers)
        self.first, self.last = 0 in self.stage_ids, n_stages - 1 in self.stage_ids
        self.modules = [StageModule(model, layers[s], s == 0, s == n_stages - 1, grid)
                        for s in self.stage_ids]
        self.stages = [PipelineStage(m, s, n_stages, device, group=grid.group("pp"))
                       for m, s in zip(self.modules, self.stage_ids)]
        self.loss = PipelineLoss(model)
        self.n_microbatches = n_microbatches
        self.schedule = build_schedule(schedule_name(parallel), self.stages, n_microbatches,
                                       self.loss, parallel.pipeline_parallel,
                                       parallel.virtual_pipeline)
        self.embedding_group = _embedding_group(grid, parallel) if model.cfg.tie_word_embeddings else None
        for position, (name, param) in enumerate(model.named_parameters()):
            param.pipeline_order = (_part_order(name), position)  # see grads._pipeline_grad_norm

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
        self.loss.scale, self.loss.sums = scale, []
        self.schedule.step(*([inputs] if self.first else []),
                           target=labels if self.last else None)
        return self._loss_sum(inputs.device)

    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.loss.scale, self.loss.sums = 1.0, []
        self.schedule.eval(*([inputs] if self.first else []), target=labels if self.last else None)
        return self._loss_sum(inputs.device)

    def _loss_sum(self, device) -> torch.Tensor:
        total = torch.zeros(1, dtype=torch.float64, device=device)
        for s in self.loss.sums[-self.n_microbatches:]:  # in order, as the single-process loop adds
            total += s
        return total

    def reduce_tied_grads(self, main_grad: bool = False) -> None:
        """Sum the word-embedding gradients of the first and last stages: both copies get the
        same full gradient. `main_grad`: the grad buffer's accumulated gradient (summed before
        its data-parallel reduction) instead of `.grad` (summed after it)."""
        if self.embedding_group is None:
            return
        weight = self.model.embedding.word.weight
        if main_grad:
            grad = weight.main_grad
        else:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            grad = weight.grad
        dist.all_reduce(grad, group=self.embedding_group)


def build_schedule(name: str, stages: list[PipelineStage], n_microbatches: int, loss_fn,
                   pp: int, v: int):
    """The `torch.distributed.pipelining` schedule for `parallel.pipeline_schedule` (resolved)."""
    if n_microbatches < pp:
        raise ConfigError(f"train.global_batch_size: gives {n_microbatches} micro-batch(es) per "
                          f"step (global / (micro x data parallel)), fewer than the "
                          f"{pp} pipeline stages; the schedules need at least one per stage")
    if name in ("1f1b", "gpipe"):
        cls = Schedule1F1B if name == "1f1b" else ScheduleGPipe
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if name == "interleaved":
        cls = ScheduleInterleaved1F1B
    else:
        cls = ScheduleZBVZeroBubble if v == 2 else ScheduleInterleavedZeroBubble  # see rank_stages
    try:
        return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    except ValueError as err:
        raise ConfigError(f"train.global_batch_size: {n_microbatches} micro-batches per step do "
                          f"not fit the {name} schedule: {err}") from None


def _embedding_group(grid: Grid, parallel: ParallelConfig):
    """The process group of the two ranks (same data- and tensor-parallel coordinates) holding
    the first and the last stage; None on other ranks or when one rank holds both. Creating
    groups is collective: every rank creates all of them, in the same order."""
    last_stage = parallel.pipeline_parallel * parallel.virtual_pipeline - 1
    first_rank = 0
    last_rank = next(r for r in range(parallel.pipeline_parallel)
                     if last_stage in rank_stages(parallel, r))
    if first_rank == last_rank:
        return None
    ranks = grid.mesh.mesh  # [pp, dp, tp] global ranks
    mine = None
    for d in range(grid.dp):
        for t in range(grid.tp):
            members = [int(ranks[first_rank, d, t]), int(ranks[last_rank, d, t])]
            group = dist.new_group(members)
            if grid.rank in members:
                mine = group
    return mine


def reduce_data_parallel_grads(params, grid: Grid, weight: float = 1.0) -> None:
    """Sum gradients, each rank's weighted by `weight` (its share of the step's tokens), over the
    data-parallel group, one flat all-reduce per dtype (the pipeline's replacement for DDP, whose
    reducer PipelineStage drives only for full backwards)."""
    if grid.dp == 1:
        return
    buckets: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in buckets.values():
        flat = _flatten_dense_tensors(grads).mul_(weight)
        dist.all_reduce(flat, group=grid.group("dp"))
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)


def _part_order(name: str) -> tuple[int, int]:
    """Where a parameter's part comes in the whole model: embedding, blocks by index, final
    norm, output layer (the order `GPT.named_parameters` gives in one process)."""
    part, _, rest = name.partition(".")
    if part == "blocks":
        return 1, int(rest.split(".", 1)[0])
    return {"embedding": (0, 0), "final_norm": (2, 0), "head": (3, 0)}[part]
