"""Helpers the parallel test modules run on every rank of their 4-process world."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from starcoder.config import ParallelConfig, load_config
from starcoder.models import GPT, init_weights
from starcoder.parallel import copy_group, init_grid, parallelize

_GRIDS: dict = {}


def grid(tp: int, sequence_parallel: bool = False):
    """A tp x (4 / tp) grid of the test world: TP 2 runs as two identical data-parallel replicas.
    Meshes are built once per process and shared by the layouts."""
    if tp not in _GRIDS:
        _GRIDS[tp] = init_grid(ParallelConfig(tensor_parallel=tp))
    return dataclasses.replace(_GRIDS[tp], sequence_parallel=sequence_parallel and tp > 1)


def model_config(preset: str, tp: int, sp: bool, overrides=()):
    """The model section of a preset, validated with this parallel layout."""
    sets = [f"parallel.tensor_parallel={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
            *overrides]
    return load_config(preset, sets).model


def reference_and_parallel(cfg, g, seed: int = 1):
    """The single-process model (padded for TP 1) and the parallel one, both from `seed`."""
    ref = GPT(cfg)
    init_weights(ref, cfg, seed)
    model = parallelize(GPT(cfg, padded_vocab_size=cfg.padded_vocab_size(g.tp)), g)
    init_weights(model, cfg, seed)
    return ref, model


def batch(cfg, seed: int, size=(2, 32)):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, size, generator=gen)
    labels = torch.randint(0, cfg.vocab_size, size, generator=gen)
    labels[0, :3] = -100  # ignored positions
    return ids, labels


def local_and_reference(param, full: torch.Tensor, vocab_size: int, vocab_param: bool):
    """This rank's `param` (or its gradient's) part and the same part of the reference's full
    tensor. Vocabulary tensors are compared on real rows only: the reference pads for TP 1."""
    slices = getattr(param, "shard_slices", ())
    if not vocab_param:
        return slice(None), full[slices]
    lo, hi = slices[0].start or 0, min(slices[0].stop or full.shape[0], vocab_size)
    hi = max(lo, hi)
    return slice(0, hi - lo), full[lo:hi]


def copies_identical(tensors_by_param, g) -> bool:
    """Whether every replicated tensor is bit-identical on all the TP ranks that hold it.
    `tensors_by_param`: (param, tensor) pairs; one all-gather per copy group."""
    buckets: dict = {}
    for param, tensor in tensors_by_param:
        if getattr(param, "tp_copies", 1) > 1:
            buckets.setdefault(param.tp_copies, ([], copy_group(param, g)))[0].append(tensor.flatten())
    same = True
    for tensors, group in buckets.values():
        flat = torch.cat(tensors)
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, flat, group=group)
        same &= all(torch.equal(parts[0], p) for p in parts[1:])
    return same


def trained_parameters(cfg) -> dict:
    """Train `cfg` on this rank (the trainer itself) and return its trained parameters:
    {name: (full shape, this rank's slices as (start, stop) pairs, tensor)}."""
    from tests.training.helpers import run_trainer

    trainer = run_trainer(cfg)
    out = {}
    for name, p in trainer.model.named_parameters():
        shape = tuple(getattr(p, "full_shape", p.shape))
        slices = tuple(s.indices(n)[:2] for s, n in zip(getattr(p, "shard_slices", ()), shape))
        out[name] = shape, slices, p.detach().clone()
    return out
