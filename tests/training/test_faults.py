"""Fault injection: one run killed with SIGKILL at every named point of a save (the test-only
hook STARCODER_FAULT=<point>:<step>) and then at 3 random moments, restarted after each kill; the
losses it logs are bit-identical to those of a run that was never interrupted. (A kill of the
real `starcoder train` command is in test_launch.py.)

The random kills land a random number of logged steps into a segment plus a random fraction of a
step or save, never a number of seconds: a fast machine then cannot finish the run before the
third kill (as CI once did with kills at up to 0.3 s), and a slow one still kills mid-run."""

import contextlib
import os
import random
import signal
import time
from pathlib import Path

import torch

from starcoder.convert.checkpoints import step_folders
from starcoder.training.trainer import train
from tests.training.helpers import metrics, tiny_config

# 30 steps leave room for the three kills below: each segment advances at most ~6 steps past its
# resume point (3 logged, then up to 50 ms), from step 6.
SETS = ("train.max_steps=30", "train.save_every=2")


def _steps(run):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in metrics(run)]


def _segment(cfg, fault=None, kill_after=None) -> int:
    """Run the trainer in a forked child (a real process to SIGKILL, without the seconds a fresh
    interpreter takes to import torch). `kill_after=(steps, seconds)`: kill it `seconds` after it
    has logged `steps` new steps. Returns the child's wait status: 0, or -SIGKILL."""
    log = Path(cfg.train.output_dir) / "metrics.jsonl"
    logged = len(log.read_text().splitlines()) if log.is_file() else 0
    pid = os.fork()
    if pid == 0:  # the child: train, then leave without running the parent's clean-up
        code = 1
        try:
            if fault:
                os.environ["STARCODER_FAULT"] = fault
            train(cfg)
            code = 0
        finally:
            os._exit(code)
    if kill_after is not None:
        deadline = time.monotonic() + 120
        steps, seconds = kill_after
        while not (log.is_file() and len(log.read_text().splitlines()) >= logged + steps):
            assert time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0)
            time.sleep(0.005)
        time.sleep(seconds)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_kill_9_at_every_point_of_a_save_and_at_random_times(corpus, tmp_path):
    run = tmp_path / "run"
    torch.set_num_threads(1)
    train(tiny_config(corpus, tmp_path / "reference", *SETS))
    reference = _steps(tmp_path / "reference")
    cfg = tiny_config(corpus, run, *SETS)

    # point of the save -> the checkpoint the next start must resume from
    for fault, resumes in (("after_shard:2", None), ("before_manifest:4", "step_0000002"),
                           ("before_latest:6", "step_0000006")):
        assert _segment(cfg, fault) == -signal.SIGKILL, fault
        assert _steps(run) == reference[: len(_steps(run))]
        newest = [p.name for p in step_folders(run)][:1]
        assert newest == ([resumes] if resumes else []), (fault, newest)

    rng = random.Random(0)
    for _ in range(3):
        when = (rng.randint(1, 3), rng.uniform(0.0, 0.05))
        assert _segment(cfg, kill_after=when) == -signal.SIGKILL, when
        assert _steps(run) == reference[: len(_steps(run))]
    assert len(_steps(run)) < len(reference)  # the kills interrupted the run
    assert _segment(cfg) == 0
    assert _steps(run) == reference  # bit for bit
