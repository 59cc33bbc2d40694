"""Dropout randomness under tensor parallelism (Megatron's RNG tracker, without its state).

Which masks must agree across the tensor-parallel ranks:
- replicated activations (embedding and hidden dropout without sequence parallel): the same mask
  on every TP rank, so the default generators must be seeded alike on all of them;
- a rank's own attention heads, and its own sequence shard under sequence parallel: different
  masks per TP rank.

LoRA adapter dropout is of the first kind, on a column shard too: it draws the whole input's mask
and applies the rank's columns (`starcoder.finetune.lora.LoRADropout`), as one process would.
Attention forks for its dropout only (`Attention.rng_fork`), so the adapters around it keep the
shared stream.

`tp_rng_fork` gives the second kind. Instead of keeping a separate generator state (which
activation recomputation would have to save and restore, as Megatron's own checkpoint function
does), it derives the fork's seed from one draw of the CPU default generator, which every TP rank
shares, plus the TP rank. `torch.utils.checkpoint` restores the default generators before
recomputing, so the replay draws the same seed and gets the same masks, with selective or full
recomputation alike.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

_TP_SEED_OFFSET = 2718  # Megatron's offset for the tensor-parallel stream


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


def _seed(device: torch.device, seed: int) -> None:
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        with torch.get_device_module(device.type).device(device):
            torch.get_device_module(device.type).manual_seed(seed)


@contextlib.contextmanager
def tp_rng_fork(tp_rank: int, device: torch.device):
    """Run the body with `device`'s default generator on a stream of its own for this TP rank."""
    draw = int(torch.randint(0, 2**62, (1,)).item())  # CPU default generator: same on all TP ranks
    saved = _get_state(device)
    _seed(device, draw + _TP_SEED_OFFSET + tp_rank)
    try:
        yield
    finally:
        _set_state(device, saved)


class TPDropout(nn.Dropout):
    """Dropout whose mask differs across TP ranks (for sequence-parallel regions)."""

    def __init__(self, p: float, tp_rank: int):
        super().__init__(p)
        self.tp_rank = tp_rank

    def rng_fork(self, device: torch.device):
        """The RNG stream this module drops out with; fused dropout kernels draw their seeds in it
        (`starcoder.models.ops.bias_dropout_add`)."""
        return tp_rng_fork(self.tp_rank, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        with self.rng_fork(x.device):
            return super().forward(x)
