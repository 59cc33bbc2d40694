"""Megatron initialisation, independent of the parallel layout.

Every weight is N(0, init_method_std); the output projections of attention and MLP use
std / sqrt(2 * num_layers) (Megatron's `scaled_init_method_normal`); biases start at 0 and
LayerNorms at (1, 0). Each parameter's *full* tensor is drawn from its own generator, seeded by
the run seed and the parameter's name, and a sharded parameter keeps only its slice: the same seed
gives the same model at any tensor, pipeline or data parallel size.

Parallel layers describe a shard with two attributes on the parameter: `full_shape` (the global
shape) and `shard_slices` (a tuple of slices selecting this rank's part of the full tensor).
"""

from __future__ import annotations

import math
import zlib
import torch
import torch.nn as nn

from starcoder.config import ModelConfig

SCALED_OUTPUTS = ("attn.out_proj.weight", "mlp.fc_out.weight")

def init_std(name: str, cfg: ModelConfig) -> float:
    if name.endswith(SCALED_OUTPUTS):
        return cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
    return cfg.init_method_std


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        norm = "_norm." in name or name.startswith("final_norm.")
        if leaf == "bias":
            param.zero_()
        elif norm:
            param.fill_(1.0)
        else:
            gen = torch.Generator(device=param.device).manual_seed(_param_seed(seed, name))
            full = torch.empty(getattr(param, "full_shape", param.shape), dtype=torch.float32,
                               device=param.device)
            full.normal_(0.0, init_std(name, cfg), generator=gen)
            param.copy_(full[getattr(param, "shard_slices", ())])


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
