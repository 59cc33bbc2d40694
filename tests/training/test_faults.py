"""Fault injection: one run killed with SIGKILL at every named point of a save (the test-only
hook STARCODER_FAULT=<point>:<step>) and then at 3 random times, restarted after each kill; the
losses it logs are bit-identical to those of a run that was never interrupted. (A kill of the
real `starcoder train` command is in test_launch.py.)"""

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

SETS = ("train.max_steps=20", "train.save_every=2")


def _steps(run):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in metrics(run)]


def _segment(cfg, fault=None, kill_after=None) -> int:
    """Run the trainer in a forked child (a real process to SIGKILL, without the seconds a fresh
    interpreter takes to import torch); kill it `kill_after` seconds after its first logged
    step. Returns the child's wait status: 0, or -SIGKILL."""
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
        while not (log.is_file() and len(log.read_text().splitlines()) > logged):
            assert time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0)
            time.sleep(0.005)
        time.sleep(kill_after)
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
    kills = 0
    while kills < 3:
        status = _segment(cfg, kill_after=rng.uniform(0.0, 0.3))
        assert status in (0, -signal.SIGKILL)
        assert _steps(run) == reference[: len(_steps(run))]
        if status == 0:
            break  # finished before the kill landed: nothing left to interrupt
        kills += 1
    assert _segment(cfg) == 0
    assert _steps(run) == reference  # bit for bit
    assert kills == 3
