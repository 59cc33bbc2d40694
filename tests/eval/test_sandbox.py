"""Hostile programs fail harmlessly inside the sandbox, within its limits (run as root in CI)."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from starcoder.eval.sandbox import Limits, Sandbox


@pytest.fixture(scope="module")
def sandbox(sandbox):
    """The session's sandbox (skips without bubblewrap), with a small output cap."""
    return Sandbox(Limits(output_bytes=100_000))


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
    start = time.monotonic()
    r = sandbox.run(program, timeout=1.0)
    assert r.result == "timed out" and time.monotonic() - start < 5
    # The namespace's init dies with bwrap and the kernel kills the rest; give it a moment.
    deadline = time.monotonic() + 3
    while _processes_of(65534) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_of(65534), "sandboxed processes outlived the timeout"


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
