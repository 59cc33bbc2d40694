"""Stopping on signals: SIGTERM and SIGUSR1 (SLURM's preemption), SIGINT (Ctrl-C) and SIGHUP (an
SSH drop) only set a flag; at every step boundary all ranks all-reduce it (MAX), so a signal that
reached any rank stops every rank at the same step, where the trainer saves a checkpoint and
exits 0.

Signals that arrive during a save (`with stop.deferred():`) are only recorded, so nothing can
interrupt a checkpoint before it has committed. A second SIGINT outside a save is the user who
does not want to wait: the process exits at once (status 130), without a save.

How the signal reaches the ranks (srun, torchrun's --signals-to-handle, the save window) is in
docs/training.md.
"""

from __future__ import annotations

import contextlib
import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """Install with `with StopRequest() as stop:`; previous handlers come back on exit."""

    def __init__(self):
        self.signum = 0
        self.saving = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        # Record only, act at the step boundary; except a repeated Ctrl-C outside a save.
        if signum == signal.SIGINT and self.signum == signal.SIGINT and not self.saving:
            os.write(2, b"second SIGINT: exiting now, without a checkpoint\n")
            os._exit(128 + signal.SIGINT)
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def deferred(self):
        """Within this block every signal only waits for the step boundary."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def agreed(self, device) -> int:
        """The signal number any rank received (0 if none), the same on every rank."""
        import torch  # not at import time: the CLI installs the handlers before importing torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
