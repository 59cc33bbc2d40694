"""Mixed precision as Megatron does it: `bf16`/`fp16` hold the model's weights in that dtype, with
fp32 main weights and Adam state in the optimizer (`starcoder.parallel.distributed_optimizer`) and
gradients accumulated and reduced in fp32 (`parallel.grad_reduce_in_fp32`). Nothing is re-cast per
micro-batch and no autocast runs: activations and tensor-/sequence-parallel collectives are in the
weights' dtype, while cross-entropy statistics, the loss, the gradient norm and the reductions of
replicated gradients are fp32. `fp32` is fp32 throughout; `auto` is bf16 on GPUs and fp32 on CPUs.

The loss scaler (fp16) is Megatron's dynamic scaler rather than torch's GradScaler because the
decision to skip a step must be global: it follows the all-reduced gradient norm
(`starcoder.parallel.any_nonfinite`), so every rank backs off or grows the scale together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from starcoder.config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(t: TrainConfig, device: torch.device) -> str:
    if t.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return t.precision
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
