"""Scripts written by `starcoder launch`, run by a real single-node Slurm on localhost (2 CPU tasks,
gloo, a tiny model): (a) USR1 to the batch shell as before the time limit -> checkpoint, requeue,
resume, finish; (b) one rank SIGKILLed mid-run -> requeue, resume from the last checkpoint;
(c) uninterrupted -> no requeue; (d) one rank stopped (SIGSTOP) mid-run, a hung collective ->
parallel.collective_timeout_s fails rank 0, srun ends the step, requeue, resume. (a), (b) and (d)
log the same losses as (c), bit for bit.

The three jobs are submitted together and run one after another (each takes the node's 2 CPUs)."""

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from starcoder.cli import main
from tests.slurm.cluster import slurm  # noqa: F401  (the fixture)
from tests.training.helpers import TINY, make_corpus, metrics

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 160, 40
HANG_TIMEOUT = 5  # parallel.collective_timeout_s of job (d)


def launch(corpus, run: Path, *extra_sets: str) -> tuple[Path, str]:
    sets = [*TINY, f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}", "log.every=1",
            f"data.paths=[{corpus}]", f"train.output_dir={run}", *extra_sets]
    argv = ["launch", "--config", "tiny-sc2", "--nodes", "1", "--cpu-tasks-per-node", "2",
            "--time", "00:30:00", "--signal-lead", "60", "--max-restarts", "2"]
    for item in sets:
        argv += ["--set", item]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    lines = out.getvalue().splitlines()
    job = next(line.split()[-1] for line in lines if line.startswith("submitted job"))
    return Path(lines[-1]), job


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def steps_done(run: Path) -> int:
    try:
        return max((r["step"] for r in metrics(run)), default=0)
    except (OSError, ValueError):
        return 0


def wait_for(condition, what: str, timeout: float = 150):
    deadline = time.monotonic() + timeout
    while not condition():
        queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
        assert time.monotonic() < deadline, f"timed out waiting for {what}; squeue:\n{queue}"
        time.sleep(0.3)


def rank_pid(job: str, rank: int) -> int | None:
    """The PID of one rank of a job: a process of this machine with its SLURM_JOB_ID and PROCID."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if want <= env and b"starcoder" in cmd and b"train" in cmd:
            return int(proc.name)
    return None


def finished(job: str, run: Path) -> bool:
    marker = run / "stop.json"
    return (job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")
            and marker.is_file() and json.loads(marker.read_text())["reason"] == "finished")


def restarts(run: Path) -> list[dict]:
    path = run / "restarts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def runs(slurm, tmp_path_factory):
    """Submit (a), (b), (c); send USR1 to (a) and SIGKILL to a rank of (b) mid-run; wait for all."""
    tmp = tmp_path_factory.mktemp("runs")
    corpus = make_corpus(tmp / "corpus")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = str(ROOT)  # the jobs inherit this environment (sbatch --export=ALL)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        jobs = {name: launch(corpus, tmp / name) for name in ("usr1", "kill", "plain")}
        jobs["hang"] = launch(corpus, tmp / "hang", f"parallel.collective_timeout_s={HANG_TIMEOUT}")
        usr1, kill, hang = ((tmp / name, jobs[name][1]) for name in ("usr1", "kill", "hang"))

        # (a) past the first checkpoint, USR1 to the batch shell, as --signal=B:USR1@lead does.
        wait_for(lambda: steps_done(usr1[0]) >= SAVE_EVERY + 10, "job (a) to train")
        subprocess.run(["scancel", "--batch", "--signal=USR1", usr1[1]], check=True)
        # (b) past the first checkpoint, SIGKILL to rank 1.
        wait_for(lambda: steps_done(kill[0]) >= SAVE_EVERY + 10 and rank_pid(kill[1], 1), "job (b) to train")
        os.kill(rank_pid(kill[1], 1), signal.SIGKILL)
        # (d) past the first checkpoint, SIGSTOP to rank 1: rank 0 waits in a collective.
        wait_for(lambda: steps_done(hang[0]) >= SAVE_EVERY + 10 and rank_pid(hang[1], 1), "job (d) to train")
        os.kill(rank_pid(hang[1], 1), signal.SIGSTOP)

        for name, (script, job) in jobs.items():
            wait_for(lambda: finished(job, tmp / name), f"job {name} to finish", timeout=200)
        yield {name: (tmp / name, job_info(job)) for name, (script, job) in jobs.items()}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]


def status(run: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", str(run)]) == 0
    return out.getvalue()


def slurm_log(run: Path) -> str:
    return "".join(p.read_text() for p in run.glob("slurm-*.out"))


def test_uninterrupted_job_ends_without_a_requeue(runs):
    run, info = runs["plain"]
    assert info["Restarts"] == "0" and info["JobState"] == "COMPLETED", info
    assert restarts(run) == []
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
    text = status(run)
    assert f"steps done: {STEPS}" in text and "restarts: 0 (0 after failures)" in text, text
    assert f"last checkpoint: step_{STEPS:07d}" in text and "last stop: finished" in text, text


def test_usr1_checkpoints_requeues_resumes_and_finishes_bit_identically(runs):
    run, info = runs["usr1"]
    assert info["Restarts"] == "1" and info["JobState"] == "COMPLETED", info
    (record,) = restarts(run)
    assert record["cause"] == "time_limit" and record["requeued"] is True and record["exit_status"] == 0, record
    stopped_at = record["step"]
    assert SAVE_EVERY < stopped_at < STEPS and record["checkpoint"] == f"step_{stopped_at:07d}", record
    log = slurm_log(run)
    assert "received SIGUSR1" in log and f"resumed from {run}/checkpoints/step_{stopped_at:07d}" in log, log
    assert losses(run) == losses(runs["plain"][0])  # bit for bit
    text = status(run)
    assert "restarts: 1 (0 after failures)" in text and "time limit near" in text, text


def test_a_killed_rank_requeues_and_resumes_from_the_last_checkpoint(runs):
    run, info = runs["kill"]
    assert info["Restarts"] == "1" and info["JobState"] == "COMPLETED", info
    (record,) = restarts(run)
    assert record["cause"] == "failure" and record["requeued"] is True and record["exit_status"] != 0, record
    assert record["step"] > SAVE_EVERY  # rank 0's stop marker: failed in a collective there
    checkpoint = record["checkpoint"]
    assert checkpoint.startswith("step_") and int(checkpoint[5:]) % SAVE_EVERY == 0, record
    assert f"resumed from {run}/checkpoints/{checkpoint}" in slurm_log(run)
    assert losses(run) == losses(runs["plain"][0])  # bit for bit
    text = status(run)
    assert "restarts: 1 (1 after failures)" in text and "the step failed" in text, text


def test_a_hung_collective_times_out_requeues_and_resumes(runs):
    run, info = runs["hang"]
    assert info["Restarts"] == "1" and info["JobState"] == "COMPLETED", info
    (record,) = restarts(run)
    assert record["cause"] == "failure" and record["requeued"] is True and record["exit_status"] != 0, record
    log = slurm_log(run)
    assert "timed out" in log.lower() or "timeout" in log.lower(), log  # gloo's error on rank 0
    assert f"resumed from {run}/checkpoints/{record['checkpoint']}" in log
    assert losses(run) == losses(runs["plain"][0])  # bit for bit
