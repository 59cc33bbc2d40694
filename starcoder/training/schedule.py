"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to `min_lr`.

A pure function of the step number, so the schedule needs no state of its own in a checkpoint
(the step is saved) and a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

import math

from starcoder.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (1-based: the first update is step 1).

    Warmup rises linearly to `lr` over `warmup_steps` (or `warmup_ratio` of `max_steps`); decay
    then runs until `lr_decay_steps` (default `max_steps`) and holds `min_lr` after that.
    `constant` keeps `lr` after warmup.
    """
    warmup = warmup_steps(t)
    if step <= warmup:
        return t.lr * step / warmup
    if t.lr_schedule == "constant":
        return t.lr
    decay_steps = t.lr_decay_steps or t.max_steps
    span = decay_steps - warmup
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    if t.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        factor = 1.0 - progress
    return t.min_lr + (t.lr - t.min_lr) * factor


def warmup_steps(t: TrainConfig) -> int:
    """`warmup_steps`, or `warmup_ratio` of `max_steps` rounded up (transformers' rule)."""
    if t.warmup_ratio is None:
        return t.warmup_steps
    return math.ceil(t.warmup_ratio * t.max_steps)
