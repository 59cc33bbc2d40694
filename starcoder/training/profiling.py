"""`train.profile_steps: [a, b]`: a torch.profiler trace of steps a..b (Chrome / TensorBoard
format, open it in Perfetto or chrome://tracing) and, on CUDA, a memory snapshot of the same steps
(`torch.cuda.memory._record_memory_history`; drag it onto pytorch.org/memory_viz), written to
`<output_dir>/profile/` per rank."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, steps: list[int] | None, run_dir: Path, device: torch.device, rank: int):
        self.first, self.last = steps or (None, None)
        self.out = run_dir / "profile"
        self.cuda, self.rank = device.type == "cuda", rank
        self.profiler = None

    def before_step(self, step: int) -> None:
        """Call before running `step` (1-based)."""
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True,
                                               profile_memory=True)
        self.profiler.start()

    def after_step(self, step: int) -> None:
        """Call after `step` ran; at the last profiled step, write the files."""
        if self.profiler is None or step != self.last:
            return
        self.profiler.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"steps_{self.first}-{self.last}_rank{self.rank}"
        trace = self.out / f"{name}.trace.json"
        self.profiler.export_chrome_trace(str(trace))
        self.profiler = None
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.out / f"{name}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info(f"profile of steps {self.first}-{self.last} written to {trace}")
