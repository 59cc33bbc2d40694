"""LoRA (Hu et al. 2021) on any layout: `apply_lora(model, cfg, grid)` freezes the model and adds
trainable low-rank adapters to the projections `finetune.lora_targets` names.

An adapted projection computes W x + b + (alpha / r) B A dropout(x), with A [r, in] drawn as
PEFT draws it (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and B [out, r] zero, so
training starts from the base model. q_proj and kv_proj share one adapter, A over the attention
input and B over [q; kv] (`gpt.Attention.input_adapter`), which is PEFT's adapter on
GPTBigCode's fused `c_attn` at the same rank. Names, shapes and export: `starcoder.convert.lora`.

Tensor parallelism (applied after `parallelize`): A and B follow their base layer.
- Column-parallel base (q_proj, kv_proj, fc_in; output rows split): A is replicated and sees the
  whole (gathered) input, but each rank's gradient of A comes only from its own output rows, so
  it is a partial gradient summed over the TP group (`partial_grad`, `reduce_replicated_grads`).
  B is split by rows as the base weight, and replicated where the base is: MQA's kv rows held by
  several ranks carry the base's `tp_copies` and partial gradient.
- Row-parallel base (out_proj, fc_out; input columns split): A is split by columns, and each
  rank's B A_r x_r is added to the base's partial sum before the one reduction. B is replicated
  and its per-rank gradient is partial.
Every full A is drawn from a generator seeded by the run seed and the tensor's name, then sliced,
so every layout starts from the same adapters. Adapter dropout (`LoRADropout`) draws from the
default generators, which the TP ranks share, the mask of the whole input: a replicated (or
gathered) input gets one process's mask on every rank, a row-parallel base's column shard gets
its columns of it, so every layout computes what one process computes.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from starcoder.config import Config
from starcoder.convert.lora import lora_shapes, scaling
from starcoder.models.gpt import GPT
from starcoder.parallel.grid import Grid
from starcoder.parallel.layers import (ColumnParallelLinear, RowParallelLinear, input_to_tp,
                                       mark_replicated, output_from_tp, shard_parameter)


class LoRADropout(nn.Module):
    """Dropout of an adapter's input x, possibly columns `columns` of a `width`-wide input held
    whole by one process (a row-parallel base's input shard): it draws the whole input's keep
    mask from the default generator and applies its `columns`. Not `TPDropout`'s per-rank stream:
    every TP rank draws the same mask, one process's."""

    def __init__(self, p: float, width: int | None = None, columns: slice = slice(None)):
        super().__init__()
        self.p, self.width, self.columns = p, width, columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = (*x.shape[:-1], self.width or x.shape[-1])
        keep = torch.empty(shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - self.p)
        # keep, then scale, as F.dropout does: one process gets nn.Dropout's numbers on CPU
        return x * keep[..., self.columns] * (1.0 / (1.0 - self.p))


class LoRALinear(nn.Module):
    """A dense, column- or row-parallel linear layer (same interface, same `weight` and `bias`
    parameters) plus a low-rank update `lora_B @ lora_A`."""

    def __init__(self, base: nn.Module, lora_A: nn.Parameter, lora_B: nn.Parameter,
                 scale: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B = lora_A, lora_B
        self.split = ("column" if isinstance(base, ColumnParallelLinear)
                      else "row" if isinstance(base, RowParallelLinear) else None)
        self.grid = getattr(base, "grid", None)
        self.enter_region = getattr(base, "enter_region", False)
        self.scale = scale
        if self.split == "row":  # the input is this rank's columns of the whole input
            self.dropout = LoRADropout(dropout, base.weight.full_shape[1], base.weight.shard_slices[1])
        else:
            self.dropout = LoRADropout(dropout)
        self.enabled = True  # False: the base layer alone (`adapters_off`)

    def forward(self, x: torch.Tensor, return_bias: bool = False):
        if self.split == "column" and self.enter_region:
            x = input_to_tp(x, self.grid)
        y = F.linear(x, self.weight)
        if self.enabled:
            y = y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        if self.split == "row":  # the low-rank partial sums reduce with the base's
            y = output_from_tp(y, self.grid)
        if return_bias:
            return y, self.bias
        return y if self.bias is None else y + self.bias


class AttentionInputLoRA(nn.Module):
    """The adapter over [q; kv]: one A on the attention input, B split into q rows (`lora_B_q`)
    and kv rows (`lora_B_kv`); either is None when its projection is not a target. Returns the
    updates (dq, dkv) the attention adds to its projections (0 for an untargeted one)."""

    def __init__(self, lora_A: nn.Parameter, lora_B_q: nn.Parameter | None,
                 lora_B_kv: nn.Parameter | None, scale: float, dropout: float):
        super().__init__()
        self.lora_A, self.lora_B_q, self.lora_B_kv = lora_A, lora_B_q, lora_B_kv
        self.scale = scale
        self.dropout = LoRADropout(dropout)  # on the whole (copied or gathered) attention input
        self.enabled = True  # False: no update (`adapters_off`)

    def forward(self, x: torch.Tensor):
        if not self.enabled:
            return 0.0, 0.0
        h = self.scale * F.linear(self.dropout(x), self.lora_A)
        return tuple(0.0 if b is None else F.linear(h, b) for b in (self.lora_B_q, self.lora_B_kv))


@torch.no_grad()
def apply_lora(model: GPT, cfg: Config, grid: Grid | None = None) -> GPT:
    """Freeze every parameter of `model` (built for `cfg.model`, possibly parallelized over
    `grid`, materialised) and add the adapters `cfg.finetune` describes, initialised from
    `cfg.train.seed`. Returns the model; call it on every rank alike (no collectives)."""
    f = cfg.finetune
    for param in model.parameters():
        param.requires_grad_(False)
    shapes = lora_shapes(cfg)
    scale = scaling(cfg)

    def make_a(name: str, base_weight: torch.Tensor) -> nn.Parameter:
        full = torch.empty(shapes[name], dtype=torch.float32, device=base_weight.device)
        gen = torch.Generator(device=full.device).manual_seed(_seed(cfg.train.seed, name))
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        return _follow(nn.Parameter(full), base_weight, grid, side="in")

    def make_b(name: str, base_weight: torch.Tensor) -> nn.Parameter:
        full = torch.zeros(shapes[name], dtype=torch.float32, device=base_weight.device)
        return _follow(nn.Parameter(full), base_weight, grid, side="out")

    for i, block in model.blocks.items():
        attn, mlp, prefix = block.attn, block.mlp, f"blocks.{i}."
        if "q_proj" in f.lora_targets or "kv_proj" in f.lora_targets:
            a = make_a(f"{prefix}attn.input_adapter.lora_A", attn.q_proj.weight)
            bq = make_b(f"{prefix}attn.input_adapter.lora_B_q", attn.q_proj.weight) \
                if "q_proj" in f.lora_targets else None
            bkv = make_b(f"{prefix}attn.input_adapter.lora_B_kv", attn.kv_proj.weight) \
                if "kv_proj" in f.lora_targets else None
            attn.input_adapter = AttentionInputLoRA(a, bq, bkv, scale, f.lora_dropout)
        for target, parent, attr in (("out_proj", attn, "out_proj"), ("fc_in", mlp, "fc_in"),
                                     ("fc_out", mlp, "fc_out")):
            if target in f.lora_targets:
                base = getattr(parent, attr)
                module = f"{prefix}{'attn' if parent is attn else 'mlp'}.{attr}"
                setattr(parent, attr, LoRALinear(base, make_a(f"{module}.lora_A", base.weight),
                                                 make_b(f"{module}.lora_B", base.weight),
                                                 scale, f.lora_dropout))
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Inside the block the model computes its frozen base alone (every adapter skipped), e.g. a
    DPO reference under LoRA without a second copy of the model."""
    adapters = [m for m in model.modules() if isinstance(m, (LoRALinear, AttentionInputLoRA))]
    for module in adapters:
        module.enabled = False
    try:
        yield model
    finally:
        for module in adapters:
            module.enabled = True


def _follow(full: nn.Parameter, base_weight: torch.Tensor, grid: Grid | None, side: str) -> nn.Parameter:
    """This rank's part of a full A (`side` "in": its columns meet the base's input) or B ("out":
    its rows are the base's output rows), following how the base weight is split."""
    slices = getattr(base_weight, "shard_slices", None)
    if grid is None or grid.tp == 1 or slices is None:
        return full
    rows, cols = slices
    if side == "out" and rows != slice(None):  # column-parallel base: B's rows as the weight's
        part = shard_parameter(full, (rows, slice(None)), getattr(base_weight, "tp_copies", 1))
        if getattr(base_weight, "partial_grad", False):
            part.partial_grad = True
        return part
    if side == "in" and cols != slice(None):  # row-parallel base: A's columns as the weight's
        return shard_parameter(full, (slice(None), cols))
    # The other factor is whole on every TP rank, and each rank's gradient is only its share.
    mark_replicated(full, grid, partial_grad=True)
    return full


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) + 7919) % (2**63)
