"""Run folders that never lose data, checkpoints that never load corrupt, stopping on every
signal, resuming with changed settings, and exactness (one process; see docs/reliability.md)."""

import json
import logging
import os
import shutil
import signal

import pytest

from starcoder.config import ConfigError
from starcoder.convert.checkpoints import CheckpointError, latest_checkpoint, read_state
from starcoder.convert.weights import iter_weights
from starcoder.training import checkpoint as ckpt
from starcoder.training.trainer import Trainer, TrainingError, train
from tests.training.helpers import losses, metrics, tiny_config

SHARD = "dcp/shard-00001-model-00001-of-00001.safetensors"


def test_a_run_folder_without_latest_resumes_from_its_newest_step(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, "train.max_steps=4", "train.save_every=2"))
    manifests = {s: (run / f"checkpoints/step_000000{s}/manifest.json").read_bytes() for s in (2, 4)}
    (run / "checkpoints/latest").unlink()
    assert train(tiny_config(corpus, run, "train.max_steps=6", "train.save_every=2")).step == 6
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]  # nothing truncated
    for s in (2, 4):  # never overwritten
        assert (run / f"checkpoints/step_000000{s}/manifest.json").read_bytes() == manifests[s]
    assert (run / "checkpoints/latest").read_text().strip() == "step_0000006"

    # A step folder copied into a new run folder resumes there.
    copy = tmp_path / "copy"
    shutil.copytree(run / "checkpoints/step_0000004", copy / "checkpoints/step_0000004")
    assert train(tiny_config(corpus, copy, "train.max_steps=6")).step == 6
    assert losses(copy) == losses(run)[4:]
    assert json.loads((copy / "stop.json").read_text())["reason"] == "finished"


@pytest.fixture(scope="module")
def two_checkpoints(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("pristine") / "run"
    train(tiny_config(corpus, run, "train.max_steps=2", "train.save_every=1"))
    return run


def _flip(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_header(path, old: bytes, new: bytes):
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    at = data.index(old, 8, header_end)
    path.write_bytes(data[:at] + new + data[at + len(new):])


CORRUPTIONS = {  # kind -> (how, what the warning says)
    "shard data byte": (lambda d: _flip(d / SHARD), f"{SHARD} does not match its checksum"),
    "shard header dtype F32 -> I32": (lambda d: _edit_header(d / SHARD, b'"F32"', b'"I32"'),
                                      f"{SHARD} does not match its checksum"),
    "shard header offsets": (lambda d: _edit_header(d / SHARD, b'"data_offsets":[0,', b'"data_offsets":[4,'),
                             f"{SHARD} does not match its checksum"),
    "deleted shard": (lambda d: (d / SHARD).unlink(), f"{SHARD} is missing"),
    "trainer_state.json": (lambda d: _flip(d / "trainer_state.json"), "trainer_state.json does not match"),
    "config.yaml": (lambda d: _flip(d / "config.yaml"), "config.yaml does not match"),
    "tokenizer.json": (lambda d: _flip(d / "tokenizer.json"), "tokenizer.json does not match"),
    "manifest.json": (lambda d: _flip(d / "manifest.json"), "manifest.json: corrupt"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
        corpus, two_checkpoints, tmp_path, caplog, kind):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    corrupt_it, reason = CORRUPTIONS[kind]
    corrupt_it(run / "checkpoints/step_0000002")
    corrupt = sorted(p.name for p in (run / "checkpoints/step_0000002").rglob("*"))
    with pytest.raises(CheckpointError, match="step_0000002"):  # readers refuse it
        dict(iter_weights(run / "checkpoints/step_0000002")[1])

    with caplog.at_level(logging.WARNING, logger="starcoder.train"):
        trainer = Trainer(tiny_config(corpus, run, "train.max_steps=3"))
    trainer.close()
    assert trainer.state.step == 1  # resumed from the previous checkpoint
    kept = run / "checkpoints/step_0000002.corrupt"
    assert sorted(p.name for p in kept.rglob("*")) == corrupt  # set aside, nothing deleted
    assert not (run / "checkpoints/step_0000002").exists()
    assert (run / "checkpoints/latest").read_text().strip() == "step_0000001"
    assert "set aside" in caplog.text and "step_0000002" in caplog.text and reason in caplog.text


def test_without_checksums_flipped_data_loads_but_an_edited_header_does_not(
        corpus, two_checkpoints, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    _flip(run / "checkpoints/step_0000002" / SHARD)
    off = ("train.max_steps=3", "train.verify_checksums=false")
    trainer = Trainer(tiny_config(corpus, run, *off))
    trainer.close()
    assert trainer.state.step == 2  # the documented cost of the opt-out
    _edit_header(run / "checkpoints/step_0000002" / SHARD, b'"F32"', b'"I32"')
    with caplog.at_level(logging.WARNING, logger="starcoder.train"):
        trainer = Trainer(tiny_config(corpus, run, *off))
    trainer.close()
    assert trainer.state.step == 1
    assert "is torch.int32" in caplog.text and "torch.float32" in caplog.text


def test_a_run_folder_whose_checkpoints_all_fail_stops_naming_it(corpus, two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for step in (1, 2):
        _flip(run / f"checkpoints/step_000000{step}" / SHARD)
    for _ in range(2):  # and again on the next start: never a silent restart from step 0
        with pytest.raises(CheckpointError, match=f"^{run / 'checkpoints'}: holds checkpoints but none verifies"):
            Trainer(tiny_config(corpus, run, "train.max_steps=3"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        ["latest", "step_0000001.corrupt", "step_0000002.corrupt"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_save_and_stop(corpus, tmp_path, monkeypatch, sig):
    real = Trainer.train_step

    def train_step(self, micro_batches, lr):
        if self.state.step == 2:
            os.kill(os.getpid(), sig)
        return real(self, micro_batches, lr)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    assert train(tiny_config(corpus, run, "train.max_steps=100")).step == 3
    assert read_state(latest_checkpoint(run))["train_state"]["step"] == 3
    marker = json.loads((run / "stop.json").read_text())
    assert (marker["reason"], marker["signal"], marker["step"]) == ("signal", sig.name, 3)


def test_signals_during_a_save_wait_until_it_has_committed(corpus, tmp_path, monkeypatch):
    real = ckpt.save_checkpoint

    def interrupted_save(*args, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGINT, signal.SIGHUP):
            os.kill(os.getpid(), sig)  # the second SIGINT would exit at once outside a save
        return real(*args, **kwargs)

    monkeypatch.setattr("starcoder.training.trainer.save_checkpoint", interrupted_save)
    run = tmp_path / "run"
    assert train(tiny_config(corpus, run, "train.max_steps=100", "train.save_every=2")).step == 2
    assert latest_checkpoint(run).name == "step_0000002"
    assert json.loads((run / "stop.json").read_text())["signal"] == "SIGTERM"


def test_a_failed_run_leaves_a_failed_stop_marker(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "train_step", lambda self, mbs, lr: (float("nan"), float("nan")))
    run = tmp_path / "run"
    with pytest.raises(TrainingError):
        train(tiny_config(corpus, run, "train.max_nonfinite_steps=0"))
    marker = json.loads((run / "stop.json").read_text())
    assert marker["reason"] == "failed" and "max_nonfinite_steps" in marker["error"]


def test_resuming_with_changed_settings(corpus, tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, "train.max_steps=1"))
    with pytest.raises(ConfigError, match="^model.num_layers: .*; model.hidden_size: "):
        Trainer(tiny_config(corpus, run, "model.num_layers=3", "model.hidden_size=128"))
    changed = ["train.seq_length=16", "train.global_batch_size=16", f"data.paths=['2 {corpus}']",
               "model.rope_theta=50000", "model.sliding_window=8"]
    with caplog.at_level(logging.WARNING, logger="starcoder.train"):
        Trainer(tiny_config(corpus, run, "train.max_steps=2", *changed)).close()
    warnings = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert len(warnings) == 1
    for key in ("train.seq_length 32 -> 16", "train.global_batch_size 8 -> 16", "data.paths",
                "model.rope_theta 10000.0 -> 50000.0", "model.sliding_window 16 -> 8"):
        assert key in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="starcoder.train"):  # resharding is a feature
        Trainer(tiny_config(corpus, run, "train.max_steps=2", "train.micro_batch_size=2")).close()
    assert "changed settings" not in caplog.text


def test_resume_is_exact_with_loader_workers_fim_and_dropout(corpus, tmp_path):
    sets = ("model.hidden_dropout=0.1", "data.fim_rate=0.5", "data.num_workers=1", "train.max_steps=4")
    train(tiny_config(corpus, tmp_path / "reference", *sets))
    train(tiny_config(corpus, tmp_path / "run", *sets[:-1], "train.max_steps=2"))
    train(tiny_config(corpus, tmp_path / "run", *sets))
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")  # bit for bit
