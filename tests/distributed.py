"""A persistent multi-process gloo world for tests.

Start-up costs seconds per rank, so a test module starts one world (a module-scoped fixture) and
runs many functions in it: `world.run(fn, *args)` calls `fn(*args)` on every rank (after
`init_process_group`) and returns the per-rank results. `fn` must be a module-level function.

Shutdown follows ../shared/reference/torch-distributed-cpu.md: gloo's worker threads can abort the
interpreter at exit (pytorch#190489), so workers collect garbage and pause after destroying the
group, and exit codes after the last task are not treated as failures.
"""

from __future__ import annotations

import gc
import os
import queue
import tempfile
import time
import traceback

import torch.multiprocessing as mp


class World:
    def __init__(self, size: int, timeout: float = 300.0):
        self.size, self.timeout = size, timeout
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        init = os.path.join(self._dir.name, "rendezvous")
        self._tasks = [ctx.Queue() for _ in range(size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, size, init, self._tasks[r], self._results),
                                   daemon=True) for r in range(size)]
        for p in self._procs:
            p.start()
        self._broken = False

    def run(self, fn, *args) -> list:
        if self._broken:
            raise RuntimeError("the world broke in an earlier task")
        for q in self._tasks:
            q.put((fn, args))
        results, errors = [None] * self.size, []
        for _ in range(self.size):
            try:
                rank, ok, value = self._results.get(timeout=self.timeout)
            except queue.Empty:
                self._broken = True
                self.close()
                raise TimeoutError(f"{fn.__name__}: no result within {self.timeout}s "
                                   f"(a rank failed or a collective hung); errors so far: {errors}")
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                if len(errors) == 1:
                    # Other ranks may now wait forever in a collective: give them a short grace.
                    self.timeout = min(self.timeout, 30.0)
        if errors:
            self._broken = True
            self.close()
            raise AssertionError(f"{fn.__name__} failed\n" + "\n".join(errors))
        return results

    def close(self) -> None:
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _worker(rank: int, size: int, init_file: str, tasks, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, args = item
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # report everything, including dcp.CheckpointException
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()
    gc.collect()
    time.sleep(0.2)
