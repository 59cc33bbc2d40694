"""Mixed precision: fp32 master weights and optimizer state always; the forward and backward run
under bf16 autocast on GPUs (the default there), in fp32 on CPUs, or under fp16 autocast with
dynamic loss scaling when asked for.

The loss scaler is Megatron's dynamic scaler rather than torch's GradScaler because the decision
to skip a step must be global: it follows the all-reduced gradient norm
(`starcoder.parallel.any_nonfinite`), so every rank backs off or grows the scale together.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from starcoder.config import TrainConfig


def resolve_precision(t: TrainConfig, device: torch.device) -> str:
    if t.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return t.precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class LossScaler:
    """Multiplies the loss by `scale` before backward (fp16 only; 1.0 otherwise). An overflow
    halves the scale (never below 1); `growth_interval` clean steps in a row double it."""

    scale: float = 1.0
    growth_interval: int = 1000
    clean_steps: int = 0
    dynamic: bool = False

    @classmethod
    def for_precision(cls, precision: str, t: TrainConfig) -> "LossScaler":
        if precision == "fp16":
            return cls(scale=t.initial_loss_scale, dynamic=True)
        return cls()

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if finite:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= 2.0
                self.clean_steps = 0
        else:
            self.scale = max(self.scale / 2.0, 1.0)
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.dynamic:  # a run resumed in another precision starts its own scale
            self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
