"""AdamW with Megatron's parameter groups, optionally sharded over data parallel (ZeRO-1).

Weight decay applies to matrices (linear weights, embeddings) and not to biases or LayerNorm
parameters. On CUDA the fused kernel is used. With `parallel.distributed_optimizer` each
data-parallel rank keeps Adam moments only for its share of the parameters (torch's
`ZeroRedundancyOptimizer`, which updates its share and broadcasts the new values).

Checkpoints address optimizer state by parameter name (`optimizer_state`), never by position or
rank, so a run can resume with or without ZeRO and at any data-parallel size.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from starcoder.config import Config
from starcoder.parallel.grid import Grid


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():  # de-duplicated: a tied embedding appears once
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: Config, grid: Grid,
                    device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    options = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                   fused=True if device.type == "cuda" else None)
    groups = param_groups(model, t.weight_decay)
    if cfg.parallel.distributed_optimizer and grid.dp > 1:
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW,
                                       process_group=grid.group("dp"), **options)
    return torch.optim.AdamW(groups, **options)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state (ZeRO's per-rank AdamW, or the optimizer)."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    """{parameter name: {"exp_avg": ..., "exp_avg_sq": ..., "step": ...}} for the parameters
    this rank updates. State that does not exist yet (no step taken) is created first, so a
    checkpoint load has tensors to write into."""
    local = local_optimizer(optimizer)
    _materialize_state(local)
    owned = {id(p) for group in local.param_groups for p in group["params"]}
    return {name: local.state[p] for name, p in model.named_parameters() if id(p) in owned}


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
