"""AdamW with Megatron's parameter groups, over fp32 main weights.

Weight decay applies to matrices (linear weights, embeddings) and not to biases or LayerNorm
parameters. On CUDA the fused kernel is used.

Two paths (`uses_grad_buffer`):
- fp32 without the distributed optimizer: torch's AdamW on the parameters themselves; data
  parallel is torch's DDP (`parallel.ddp_bucket_mb` buckets, fp32 all-reduce);
- bf16/fp16 weights, or `parallel.distributed_optimizer`: a `GradBuffer` (contiguous per-bucket
  weights and fp32 gradients, reduced from backward hooks) and a `DistributedOptimizer` (AdamW on
  fp32 main weights, for this rank's 1/DP slice of each bucket when sharded).

Checkpoints address weights and optimizer state by parameter name and in the parameter's shape
(`checkpoint_state`), never by position, slice or rank, so a run can resume with or without the
distributed optimizer, in any precision and at any data-parallel size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from starcoder.config import Config
from starcoder.parallel.distributed_optimizer import DistributedOptimizer
from starcoder.parallel.grad_buffer import GradBuffer
from starcoder.parallel.grid import Grid
from starcoder.training.precision import DTYPES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():  # de-duplicated: a tied embedding appears once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def uses_grad_buffer(cfg: Config, precision: str, grid: Grid) -> bool:
    return precision != "fp32" or (cfg.parallel.distributed_optimizer and grid.dp > 1)


def build_optimizer(model: nn.Module, cfg: Config, grid: Grid, device: torch.device,
                    precision: str = "fp32") -> torch.optim.Optimizer | DistributedOptimizer:
    """The optimizer for `model` (fp32 parameters); on the grad-buffer path this also moves the
    model's weights into the buffer, in the precision's dtype."""
    t, p = cfg.train, cfg.parallel
    options = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                   fused=True if device.type == "cuda" else None)
    groups = param_groups(model, t.weight_decay)
    if not uses_grad_buffer(cfg, precision, grid):
        return torch.optim.AdamW(groups, **options)
    grad_dtype = torch.float32 if p.grad_reduce_in_fp32 else DTYPES[precision]
    params = [param for param in model.parameters() if param.requires_grad]  # definition order
    for param in model.parameters():  # frozen (LoRA's base): no main weights, in the model dtype
        if not param.requires_grad:
            param.data = param.data.to(DTYPES[precision])
    buffer = GradBuffer.create(params, grid, grad_dtype, p.ddp_bucket_mb,
                               shard=p.distributed_optimizer)
    optimizer = DistributedOptimizer(buffer, groups, grid, DTYPES[precision],
                                     overlap_param_gather=p.overlap_param_gather, **options)
    if p.overlap_param_gather:
        buffer.gather_on_forward(model)
    return optimizer


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def checkpoint_state(optimizer, model: nn.Module) -> tuple[dict, dict]:
    """({name: weight}, {name: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}}) as a checkpoint
    stores them: fp32, whole per parameter (this rank's tensor-parallel part). A checkpoint load
    writes into these tensors, then calls `restore_state`."""
    if isinstance(optimizer, DistributedOptimizer):
        weights, states = optimizer.full_state(model)
        # Frozen parameters (LoRA's base) are outside the buffer: saved as the model holds them.
        weights.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
        return weights, states
    return {n: p.detach() for n, p in model.named_parameters()}, optimizer_state(optimizer, model)


def restore_state(optimizer, model: nn.Module, weights: dict, states: dict) -> None:
    """Take loaded `checkpoint_state` tensors into the optimizer and model (plain AdamW holds
    them already)."""
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.load_full_state(weights, states, model)


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    """{parameter name: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}} of a plain AdamW, for
    the parameters it trains (frozen ones have none). State
    that does not exist yet (no step taken) is created first, so a checkpoint load has tensors to
    write into."""
    _materialize_state(optimizer)
    return {name: optimizer.state[p] for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create Adam's state by one step with zero gradients and a zero learning rate, as
    torch.distributed.checkpoint.state_dict does: parameters are unchanged, and the state has
    exactly the dtype, device and layout that torch's own step gives it."""
    if optimizer.state:  # stepped (or loaded) before
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [(p, p.grad) for p in params]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p, grad in saved:
        p.grad = grad
