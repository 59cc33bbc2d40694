"""Stopping on SLURM's preemption signals: SIGTERM and SIGUSR1 only set a flag; at every step
boundary all ranks all-reduce it (MAX), so a signal that reached any rank stops every rank at the
same step, where the trainer saves a checkpoint and exits 0.

How the signal reaches the ranks (srun, torchrun's --signals-to-handle, the save window) is in
docs/training.md.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Install with `with StopRequest() as stop:`; previous handlers come back on exit."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # async-signal context: record only, act at the step boundary

    def agreed(self, device) -> int:
        """The signal number any rank received (0 if none), the same on every rank."""
        import torch  # not at import time: the CLI installs the handlers before importing torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
