"""The persistent sandbox worker: runs inside bubblewrap (started by `starcoder.eval.sandbox`
as `python3 -I -c <this file>`), standard library only. It never runs a sample itself: for
each request it forks a child that does, then returns the namespace to its clean state.

Frames on stdin/stdout (little-endian): ready `<I` (this pid); request `<dI` (timeout seconds,
program length) + program bytes; reply `<iBBBI` (exit code, timed out, output over the cap,
clean, output length) + output bytes. A reply with clean = 0 means this worker could not
restore its clean state and exits; the host starts another."""

import atexit
import ctypes
import json
import math
import os
import resource
import select
import signal
import stat
import struct
import sys
import threading  # imported here, not in each child: its _shutdown runs at a sample's end
import time
import types

WORK = "/tmp/work"
PROGRAM = f"{WORK}/program.py"
WIPED = ("/tmp", "/root", "/home", "/dev/shm")  # every writable area but /dev itself
SYSV_IPC = (("shm", "shmctl"), ("msg", "msgctl"), ("sem", "semctl"))
IPC_RMID = 0


def main(limits: dict) -> None:
    requests, replies = os.dup(0), os.dup(1)  # the child gets fresh 0-2 and none of these
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    # Non-dumpable: a sample (same uid) can neither ptrace this process nor open its
    # /proc/PID/mem or /proc/PID/fd, so it cannot reach the request pipe or forge a reply.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    dev = _listing("/dev")
    output = bytearray(limits["output_bytes"] + 65536)
    _write(replies, struct.pack("<I", os.getpid()))
    while True:
        header = _read_exactly(requests, struct.calcsize("<dI"))
        if header is None:
            return  # the host closed the pipe
        timeout, size = struct.unpack("<dI", header)
        program = _read_exactly(requests, size, into=bytearray(size))
        if program is None:
            return
        code, timed_out, overflow, used = _run_one(program, timeout, limits, output)
        program[:] = bytes(size)  # no sample's bytes stay in this process for the next one
        clean = _restore(dev, libc)
        _write(replies, struct.pack("<iBBBI", code, timed_out, overflow, clean, used))
        _write(replies, memoryview(output)[:used])
        output[:used] = bytes(used)
        if not clean:
            return


def _run_one(program: bytearray, timeout: float, limits: dict, output: bytearray):
    os.mkdir(WORK, 0o700)
    fd = os.open(f"{WORK}/program.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    _write(fd, program)
    os.close(fd)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        _child(write_end, timeout, limits)
    os.close(write_end)
    exited = os.pidfd_open(pid)
    deadline = time.monotonic() + timeout
    used, overflow, timed_out, running = 0, False, False, True
    while running and not overflow:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_end, exited], [], [], left)
        if read_end in ready:
            n = os.readv(read_end, [memoryview(output)[used:]])
            used += n
            overflow = used > limits["output_bytes"]
        running = exited not in ready
    os.kill(pid, signal.SIGKILL)  # if still running (a zombie ignores it)
    status = os.waitpid(pid, 0)[1]
    os.close(exited)
    _kill_all_but_me()  # anything it left (setsid, double forks) goes
    while not overflow and (n := os.readv(read_end, [memoryview(output)[used:]])):
        used += n  # what was written before the end; every writer is dead now
        overflow = used > limits["output_bytes"]
    os.close(read_end)
    return os.waitstatus_to_exitcode(status), timed_out, overflow, min(used, limits["output_bytes"])


def _child(output: int, timeout: float, limits: dict) -> None:
    """Runs the sample in this forked interpreter, as `python3 -I program.py` would, and exits."""
    try:
        os.setsid()
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.closerange(3, 1 << 16)
        os.chdir(WORK)
        os.environ["PWD"] = WORK
        cpu = math.ceil(timeout) + 1  # as the fresh sandbox's prlimit --cpu
        for kind, value in ((resource.RLIMIT_AS, limits["memory_bytes"]),
                            (resource.RLIMIT_CPU, cpu),
                            (resource.RLIMIT_FSIZE, limits["file_bytes"]),
                            (resource.RLIMIT_NOFILE, limits["open_files"]),
                            (resource.RLIMIT_NPROC, limits["processes"]),
                            (resource.RLIMIT_MSGQUEUE, 0), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(kind, (value, value))
        sys.argv = ["program.py"]
        with open("program.py", "rb") as f:
            source = f.read()
        module = types.ModuleType("__main__")  # a fresh __main__: pickle and dataclasses find it
        module.__file__ = PROGRAM
        sys.modules["__main__"] = module
    except BaseException:
        os._exit(125)  # the harness itself failed; reported as a failure
    status = 0
    try:
        exec(compile(source, PROGRAM, "exec"), module.__dict__)
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException as e:
        e.__traceback__ = e.__traceback__.tb_next  # from the program's frame on, as python3 shows
        sys.excepthook(type(e), e, e.__traceback__)
        status = 1
    try:
        threading._shutdown()  # non-daemon threads finish, as at interpreter exit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException:
        status = status or 1
    os._exit(status)


def _exit_status(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def _kill_all_but_me() -> None:
    """SIGKILL every process of this PID namespace but bubblewrap's init (pid 1) and this one:
    kill(-1) reaches all of them at once, so a forking process cannot outrun it."""
    me = os.getpid()
    for _ in range(1000):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return  # nothing but pid 1 and this one to signal: the common case
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        if not [p for p in _pids() if p not in (1, me)]:
            return
        time.sleep(0.001)
    raise RuntimeError("processes survived SIGKILL")


def _pids() -> list[int]:
    """Live processes (zombies are gone but for their reaping by pid 1)."""
    live = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in ("Z", "X"):
                live.append(int(name))
    return live


def _restore(dev: dict, libc) -> bool:
    """Empty every writable area, drop System V IPC objects, check /dev is as it started."""
    try:
        for area in WIPED:
            for entry in os.listdir(area):
                _remove(os.path.join(area, entry))
        for name, entry in _listing("/dev").items():
            if name not in dev:
                _remove(f"/dev/{name}")
            elif entry != dev[name]:
                return False
        if len(_listing("/dev")) != len(dev):
            return False
        for kind, call in SYSV_IPC:
            with open(f"/proc/sysvipc/{kind}") as f:
                ids = [int(line.split()[1]) for line in f.readlines()[1:]]
            for ipc_id in ids:
                args = (ipc_id, 0, IPC_RMID) if kind == "sem" else (ipc_id, IPC_RMID, None)
                if getattr(libc, call)(*args) != 0:
                    return False
        return True
    except (OSError, RuntimeError, RecursionError, ValueError, IndexError):
        return False


def _remove(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o700)  # a sample may have made its folders unreadable; it owned them
        for entry in os.listdir(path):
            _remove(os.path.join(path, entry))
        os.rmdir(path)
    else:
        os.unlink(path)


def _listing(folder: str) -> dict:
    out = {}
    for name in os.listdir(folder):
        st = os.lstat(os.path.join(folder, name))
        target = os.readlink(os.path.join(folder, name)) if stat.S_ISLNK(st.st_mode) else None
        out[name] = (stat.S_IFMT(st.st_mode), st.st_rdev, target)
    return out


def _read_exactly(fd: int, size: int, into=None):
    buf = into if into is not None else bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            return None
        got += n
    return buf


def _write(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
