"""Hostile programs fail harmlessly inside the sandbox, within its limits (run as root in CI),
both with a fresh sandbox per program and in the persistent pool; and the pool's samples cannot
see what an earlier sample in the same worker left behind."""

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from starcoder.eval import sandbox as sandbox_module
from starcoder.eval.sandbox import Limits, Sandbox, SandboxUnavailable


@pytest.fixture(scope="module", params=["fresh", "persistent"])
def sandbox(request, sandbox):
    """A sandbox in each mode (skips without bubblewrap), with a small output cap."""
    with Sandbox(Limits(output_bytes=100_000), persistent=request.param == "persistent") as box:
        yield box


@pytest.fixture(scope="module")
def pool():
    """A persistent pool of its own, for the tests about its workers."""
    with Sandbox(Limits(output_bytes=100_000), persistent=True) as box:
        try:
            box.check()
        except SandboxUnavailable as err:
            pytest.skip(f"no working bubblewrap sandbox here ({err})")
        yield box


def test_the_scratch_directory_is_writable(sandbox):
    r = sandbox.run("open('out.txt', 'w').write('x'); print(open('out.txt').read())")
    assert r.passed and r.output.strip() == "x"


def test_no_network_not_even_loopback(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted = []
    server.settimeout(5)
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    r = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    server.close()
    assert not r.passed and ("Connection refused" in r.result or "unreachable" in r.result)
    assert accepted in ([], [None])


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


def test_cannot_write_outside_scratch(sandbox, tmp_path):
    target = Path("/var/tmp") / f"starcoder-sandbox-probe-{os.getpid()}"
    r = sandbox.run(f"open({str(target)!r}, 'w').write('pwned')")
    assert not r.passed and "Read-only file system" in r.result
    assert not target.exists()


def test_cannot_remount_root_read_write(sandbox):
    target = Path("/var/tmp") / f"starcoder-remount-probe-{os.getpid()}"
    program = ("import subprocess\n"
               "r = subprocess.run(['mount', '-o', 'remount,rw,bind', '/'], capture_output=True)\n"
               f"open({str(target)!r}, 'w').write('pwned')\n")
    r = sandbox.run(program)
    assert not r.passed
    assert not target.exists()


def test_cannot_read_the_home_directory(sandbox):
    home = Path.home()
    probe = home / ".bashrc" if (home / ".bashrc").is_file() else None
    if probe is None:
        pytest.skip(f"{home} has no .bashrc to probe")
    r = sandbox.run(f"print(open({str(probe)!r}).read())")
    assert not r.passed and "No such file" in r.result


def test_environment_secrets_do_not_leak(sandbox, monkeypatch):
    monkeypatch.setenv("STARCODER_TEST_SECRET", "hunter2")
    r = sandbox.run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('STARCODER_TEST_SECRET'))")
    assert r.passed and "hunter2" not in r.output
    assert "STARCODER_TEST_SECRET" not in r.output


def test_fork_bomb_hits_the_process_limit(sandbox):
    program = ("import os\nn = 0\ntry:\n    for _ in range(300):\n        if os.fork() == 0:\n"
               "            import time; time.sleep(5); os._exit(0)\n        n += 1\n"
               "except OSError as e:\n    print('forks', n, e.errno)\n    raise SystemExit(3)\n")
    r = sandbox.run(program, timeout=10)
    assert not r.passed
    assert "forks" in r.output and int(r.output.split()[1]) < 50


def test_memory_hog_is_refused(sandbox):
    r = sandbox.run("x = bytearray(100 * 10**9)")
    assert not r.passed and "MemoryError" in r.result


def test_infinite_loop_is_killed_with_its_whole_tree(sandbox):
    program = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        break\n"
               "while True:\n    pass\n")
    sandbox.run("pass")  # the pool's idle worker (uid nobody too) is no leftover
    workers = set(_processes_of(65534))
    start = time.monotonic()
    r = sandbox.run(program, timeout=1.0)
    assert r.result == "timed out" and time.monotonic() - start < 5
    # The namespace's init dies with bwrap and the kernel kills the rest, or the worker kills
    # all but itself; give it a moment.
    deadline = time.monotonic() + 3
    while set(_processes_of(65534)) - workers and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(_processes_of(65534)) - workers, "sandboxed processes outlived the timeout"


def _processes_of(uid: int) -> list[str]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if any(line.startswith("Uid:") and line.split()[1] == str(uid) for line in text.splitlines()):
            found.append(status.parent.name)
    return found


def test_huge_output_is_capped(sandbox):
    start = time.monotonic()
    r = sandbox.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=20)
    assert not r.passed and "output over" in r.result
    assert len(r.output) <= 100_000 and time.monotonic() - start < 10


def test_killing_its_parent_harms_nothing(sandbox):
    r = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\n")
    assert not r.passed  # the kills reach only the sandbox's own namespace (ending the program)
    assert sandbox.run("print('still here')").passed  # the next one runs, and so do we


def test_many_programs_run_in_parallel(sandbox):
    results = sandbox.run_many(["assert 1 + 1 == 2", "assert 1 + 1 == 3"] * 4, workers=4)
    assert [r.passed for r in results] == [True, False] * 4


LEAVE_TRACES = """
import ctypes, os, time
for path in ("/tmp/x", "/tmp/work/y", "/dev/shm/z", "/home/h", "/root/r", "/dev/d"):
    open(path, "w").write("left")
os.mkdir("/tmp/locked"); os.chmod("/tmp/locked", 0)
assert ctypes.CDLL(None).shmget(1234, 4096, 0o1600) >= 0  # IPC_CREAT | 0600
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(30)
    os._exit(0)
print(os.getppid())
"""

SEE_TRACES = """
import os
paths = ["/tmp/x", "/tmp/work/y", "/dev/shm/z", "/home/h", "/root/r", "/dev/d", "/tmp/locked"]
others = {int(p) for p in os.listdir("/proc") if p.isdigit()} - {1, os.getppid(), os.getpid()}
print(os.getppid(), [p for p in paths if os.path.exists(p)], sorted(others),
      open("/proc/sysvipc/shm").read().count(chr(10)) - 1, sorted(os.listdir("/tmp")))
"""


def test_a_sample_leaves_nothing_for_the_next_in_its_worker(pool):
    start = time.monotonic()
    first = pool.run(LEAVE_TRACES, timeout=5)
    assert first.passed, first.output
    assert time.monotonic() - start < 3  # the sleeper it left is no reason to wait
    seen = pool.run(SEE_TRACES)
    assert seen.passed, seen.output
    worker, traces = seen.output.strip().split(maxsplit=1)
    assert worker == first.output.strip(), "not the same worker: the test proves nothing"
    assert traces == "[] [] 0 ['work']"  # no file, no process, no shared memory; a new scratch


def test_a_sample_cannot_reach_into_its_worker(pool):
    program = ("import ctypes, os\nworker = os.getppid()\n"
               "assert ctypes.CDLL(None).ptrace(16, worker, 0, 0) == -1  # PTRACE_ATTACH\n"
               "for path in (f'/proc/{worker}/mem', f'/proc/{worker}/fd/0', f'/proc/{worker}/fd/3'):\n"
               "    try:\n        open(path, 'rb')\n        print('opened', path)\n"
               "    except PermissionError:\n        pass\n")
    r = pool.run(program)
    assert r.passed and "opened" not in r.output, r.output


def test_a_worker_killed_from_outside_is_replaced(pool):
    assert all(r.passed for r in pool.run_many(["pass"] * 2, workers=2))
    for worker in pool._idle:  # the next sample is handed one of them
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
    r = pool.run("print('next')")
    assert r.passed and r.output == "next\n"


def test_a_hung_worker_is_killed_and_its_sample_timed_out(pool, monkeypatch):
    monkeypatch.setattr(pool, "worker_grace", 0.5)
    start = time.monotonic()
    r = pool.run("import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n", timeout=0.5)
    assert r.result == "timed out" and time.monotonic() - start < 3
    assert pool.run("print('next')").passed


def test_a_pool_that_cannot_start_falls_back_to_fresh_sandboxes(pool, monkeypatch, capsys):
    monkeypatch.setattr(sandbox_module, "WORKER_SOURCE", "raise SystemExit(3)")
    box = Sandbox(persistent=True)
    box.check()
    assert not box.persistent and "pool does not start" in capsys.readouterr().err
    assert box.run("print('fresh')").output == "fresh\n"


def test_closing_the_pool_leaves_no_process(pool):
    with Sandbox(persistent=True) as box:
        assert all(r.passed for r in box.run_many(["pass"] * 4, workers=2))
        procs = [w.proc for w in box._live]
        assert len(procs) == 2
    assert all(p.poll() is not None for p in procs) and not box._live
