"""Validations per second: SelfCodeAlign's local fallback (one unisolated forked process per
sample) against our sandbox, a fresh bubblewrap per sample and the persistent pool.

    python benchmarks/bench_validate.py [--repeat 10] [--workers 1 2] [--runs 3]

The programs are the planted responses of tests/selfalign/planted.jsonl that pass or fail, each
repeated `--repeat` times; the ones that time out are left out (they would time the time limit,
not the harness). The fallback's process pool and our pool's workers are started before
the timed runs (startup excluded for both). Every configuration must label every program as planted. Each is warmed
once (the workers start then), then timed `--runs` times; the best run is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout

from starcoder.eval.sandbox import Sandbox
from starcoder.selfalign.parse import parse_response, program
from starcoder.selfalign.report import read_jsonl

PLANTED = Path(__file__).resolve().parent.parent / "tests" / "selfalign" / "planted.jsonl"


# The peer: SelfCodeAlign's fallback when no execution container is given (execution_filter.py
# `fork_run`): a ProcessPoolExecutor of `workers` processes, each forking one
# multiprocessing.Process per sample that runs it in a temp folder under evalplus'
# `reliability_guard` (1 GiB), output swallowed, a signal time limit; join(timeout), pass =
# exit code 0. It isolates nothing: the program runs as this user, with this network and files.
# Two changes: exec gets a fresh globals dict (the reference's bare `exec(code)` inside a
# function puts top-level names in its locals, so a function calling another is a NameError),
# and a process still alive after join is killed (the reference leaves it running).

def reliability_guard(max_bytes: int = 1 << 30) -> None:
    """evalplus' guard: memory rlimits, and the destructive os/shutil/subprocess calls set to None."""
    for kind in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        resource.setrlimit(kind, (max_bytes, max_bytes))
    if platform.uname().system != "Darwin":
        resource.setrlimit(resource.RLIMIT_STACK, (max_bytes, max_bytes))
    faulthandler.disable()
    import builtins
    builtins.exit = builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
                 "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


class TimeoutException(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutException("timed out")
    signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@contextlib.contextmanager
def swallow_io():
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def unsafe_execute(source: str, timeout: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        chdir, rmtree, rmdir, getcwd = os.chdir, shutil.rmtree, os.rmdir, os.getcwd
        chdir(folder)
        reliability_guard()
        with swallow_io(), time_limit(timeout):
            exec(source, {"__name__": "__main__"})
        os.chdir, shutil.rmtree, os.rmdir, os.getcwd = chdir, rmtree, rmdir, getcwd  # for clean-up
        chdir("/")


def fork_run(source: str, timeout: float) -> bool:
    sys.stdout = sys.stderr = open(os.devnull, "w")
    process = multiprocessing.Process(target=unsafe_execute, args=(source, timeout))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode == 0


def fallback_run_many(programs: list[str], timeout: float, executor: ProcessPoolExecutor) -> list[bool]:
    return list(executor.map(fork_run, programs, [timeout] * len(programs)))


def planted_programs(repeat: int) -> tuple[list[str], list[bool]]:
    kept = [r for r in read_jsonl(PLANTED) if r["expected"] in ("pass", "fail")]
    programs = [program(parse_response(r["response"])) for r in kept]
    return programs * repeat, [r["expected"] == "pass" for r in kept] * repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()
    programs, expected = planted_programs(args.repeat)
    fresh, pool = Sandbox(persistent=False), Sandbox(persistent=True)
    fresh.check()
    executors = {w: ProcessPoolExecutor(w) for w in args.workers}
    configs = {
        "fallback (no isolation)": lambda w: fallback_run_many(programs, args.timeout, executors[w]),
        "fresh sandbox": lambda w: [r.passed for r in fresh.run_many(programs, args.timeout, w)],
        "persistent pool": lambda w: [r.passed for r in pool.run_many(programs, args.timeout, w)],
    }
    print(f"{len(programs)} programs ({len(programs) // args.repeat} planted x {args.repeat}), "
          f"timeout {args.timeout} s, best of {args.runs}")
    print("| workers | harness | validations/s | vs fallback | runs |\n|---:|---|---:|---:|---|")
    with pool:
        for workers in args.workers:
            rates = {}
            for name, run in configs.items():
                assert run(workers) == expected, f"{name} mislabels a planted program"  # warm-up
                runs = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    labels = run(workers)
                    runs.append(len(programs) / (time.perf_counter() - start))
                    assert labels == expected, f"{name} mislabels a planted program"
                rates[name] = runs
            base = max(rates["fallback (no isolation)"])
            for name, runs in rates.items():
                print(f"| {workers} | {name} | {max(runs):.1f} | {max(runs) / base:.2f}x | "
                      f"{' / '.join(f'{r:.1f}' for r in runs)} |")
    for executor in executors.values():
        executor.shutdown()


if __name__ == "__main__":
    main()
