"""Real processes: SIGKILL and restart (bit-exact), SIGTERM to one of two ranks (every rank
saves at the same step and exits 0), and the embedded default run end to end (short)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from starcoder.cli import main
from starcoder.config import ConfigError
from starcoder.convert.checkpoints import latest_checkpoint, read_state
from starcoder.training.distributed import world_from_environment
from starcoder.training.trainer import train
from tests.training.helpers import metrics, tiny_args, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def starcoder_train(args, env=ENV, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "starcoder", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigkill_after_a_checkpoint_then_restart_logs_identical_losses(corpus, tmp_path):
    args = tiny_args(corpus, tmp_path / "run", "train.max_steps=8", "train.save_every=3")
    # The first run SIGKILLs itself in the middle of step 5 (after the checkpoint of step 3 and
    # the log line of step 4): a patch in this launcher, not in the trainer.
    killer = textwrap.dedent(f"""
        import os, signal, sys
        from starcoder.training import trainer
        real = trainer.Trainer.train_step
        def train_step(self, micro_batches, lr):
            if self.state.step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, micro_batches, lr)
        trainer.Trainer.train_step = train_step
        from starcoder.cli import main
        sys.exit(main(["train"] + {args!r}))
    """)
    first = subprocess.run([sys.executable, "-c", killer], env=ENV, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert latest_checkpoint(tmp_path / "run").name == "step_0000003"
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]

    second = starcoder_train(args)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "resumed from" in out and "step_0000003" in out

    torch.set_num_threads(1)  # the reference, uninterrupted, in this process
    train(tiny_config(corpus, tmp_path / "reference", "train.max_steps=8", "train.save_every=3"))
    resumed = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in metrics(tmp_path / "run")]
    reference = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in metrics(tmp_path / "reference")]
    assert resumed == reference  # bit for bit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_rank_saves_on_every_rank_and_all_exit_0(corpus, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(corpus, run, "train.max_steps=100000", "train.micro_batch_size=2")
    port = str(free_port())
    ranks = [starcoder_train(args, env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in ranks), \
                [p.communicate()[0] for p in ranks if p.poll() is not None]
            time.sleep(0.05)
        ranks[1].send_signal(signal.SIGTERM)  # only rank 1 hears it
        outputs = [p.communicate(timeout=120)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in ranks] == [0, 0], outputs
    step = read_state(latest_checkpoint(run))["train_state"]["step"]
    assert 3 <= step < 100000
    assert f"received SIGTERM: stopping at step {step}" in outputs[0]  # rank 0 learnt it by all-reduce
    assert metrics(run)[-1]["step"] == step


def test_the_embedded_default_run_short(tmp_path, capsys):
    """`make train` runs `python -m starcoder demo`; this is the same path with 2 steps on 8 files."""
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--output-dir", str(tmp_path), "--steps", "2", "--max-files", "8",
                     "--threads", "1", "--set", "log.progress_bar=false"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "--- completion" in out and "--- fill-in-the-middle" in out
    assert "def fibonacci(n):" in out
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["architectures"] == ["Starcoder2ForCausalLM"]
    assert (tmp_path / "hf/tokenizer.json").is_file() and (tmp_path / "data/stdlib.idx").is_file()


def test_srun_tasks_take_their_rank_from_slurm(monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK", "MASTER_"))}
    monkeypatch.setattr(os, "environ", env)
    assert world_from_environment() == 1  # a plain process
    env.update(SLURM_STEP_NUM_TASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1")
    with pytest.raises(ConfigError, match="^MASTER_ADDR"):
        world_from_environment()
    env["MASTER_ADDR"] = "node001"
    assert world_from_environment() == 8
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("5", "8", "1", "29500")
    env["RANK"] = "3"  # torchrun's variables win over SLURM's (torchrun inside an srun step)
    env["WORLD_SIZE"] = "4"
    assert world_from_environment() == 4


def _wait_for_steps(run, procs, n):
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= n):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[0] for p in procs if p.poll() is not None]
        time.sleep(0.05)


def _ctrl_c(run, proc, send) -> None:
    """After 2 steps, `send(proc)` a Ctrl-C: the run saves, exits 0 and says so in stop.json."""
    try:
        _wait_for_steps(run, [proc], 2)
        send(proc)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in out, out
    marker = json.loads((run / "stop.json").read_text())
    assert (marker["reason"], marker["signal"]) == ("signal", "SIGINT")
    assert read_state(latest_checkpoint(run))["train_state"]["step"] == marker["step"]


def test_ctrl_c_saves_and_exits_0_without_a_traceback(corpus, tmp_path):
    run = tmp_path / "run"
    proc = starcoder_train(tiny_args(corpus, run, "train.max_steps=100000"))
    _ctrl_c(run, proc, lambda p: p.send_signal(signal.SIGINT))


def test_ctrl_c_in_a_terminal_saves_with_loader_workers(corpus, tmp_path):
    """A terminal sends Ctrl-C to the whole foreground process group, loader workers included:
    they must leave it to the trainer, which saves and exits 0."""
    run = tmp_path / "run"
    proc = starcoder_train(tiny_args(corpus, run, "train.max_steps=100000", "data.fim_rate=0.5",
                                     "data.num_workers=1"), start_new_session=True)
    _ctrl_c(run, proc, lambda p: os.killpg(p.pid, signal.SIGINT))


def test_a_second_ctrl_c_outside_a_save_exits_at_once(corpus, tmp_path):
    args = tiny_args(corpus, tmp_path / "run", "train.max_steps=100000", "train.save_every=2")
    impatient = textwrap.dedent(f"""
        import os, signal, sys
        from starcoder.training import trainer
        real = trainer.Trainer.train_step
        def train_step(self, micro_batches, lr):
            if self.state.step == 3:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, micro_batches, lr)
        trainer.Trainer.train_step = train_step
        from starcoder.cli import main
        sys.exit(main(["train"] + {args!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", impatient], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "second SIGINT: exiting now, without a checkpoint" in proc.stderr
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"  # no save at step 3 or 4
    assert not (tmp_path / "run/stop.json").exists()  # a restart decision sees no clean stop


def test_torchrun_forwards_sigusr1_when_told_and_the_stop_marker_says_what_happened(corpus, tmp_path):
    """The supported torchrun set-up (docs/training.md): --signals-to-handle with the signals the
    trainer stops on and a shutdown timeout longer than a save. torchrun's own exit code is not
    the verdict (it exits non-zero after forwarding a signal); `stop.json` is."""
    run = tmp_path / "run"
    args = tiny_args(corpus, run, "train.max_steps=100000", "train.micro_batch_size=2")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGUSR1",
         "--shutdown-timeout", "120", "-m", "starcoder", "train", *args],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(run, [agent], 3)
        agent.send_signal(signal.SIGUSR1)
        out = agent.communicate(timeout=180)[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    marker = json.loads((run / "stop.json").read_text())
    assert (marker["reason"], marker["signal"]) == ("signal", "SIGUSR1"), out
    assert read_state(latest_checkpoint(run))["train_state"]["step"] == marker["step"] >= 3
    assert f"received SIGUSR1: stopping at step {marker['step']}" in out


def test_resume_at_tensor_parallel_2_is_exact_with_loader_workers_fim_and_dropout(corpus, tmp_path):
    """Finding 10 at TP 2 under torchrun (real processes, so the loader can start workers): the
    tensor-parallel dropout seeds and the workers' base seed come from separate generators, so a
    resumed run draws the same masks as an uninterrupted one."""
    sets = ("model.hidden_dropout=0.1", "data.fim_rate=0.5", "data.num_workers=1",
            "parallel.tensor_parallel=2")

    def torchrun(run, steps):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
             "--master-port", str(free_port()), "-m", "starcoder", "train",
             *tiny_args(corpus, run, *sets, f"train.max_steps={steps}")],
            env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    torchrun(tmp_path / "reference", 4)
    torchrun(tmp_path / "run", 2)
    torchrun(tmp_path / "run", 4)
    resumed = [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(tmp_path / "run")]
    reference = [(r["step"], r["loss"], r["grad_norm"]) for r in metrics(tmp_path / "reference")]
    assert resumed == reference  # bit for bit
