"""Checkpoint verification at 4 ranks (TP 2 x DP 2, one gloo world for the module): rank 0 alone
opens the manifest and the shard headers and broadcasts them, and a corrupt shard written by
one rank sets the checkpoint aside on every rank alike."""

from __future__ import annotations

import contextlib

import pytest
import safetensors
import torch.distributed as dist
from torch.distributed.checkpoint import HuggingFaceStorageReader

from starcoder.convert import checkpoints
from starcoder.convert.checkpoints import CheckpointReader, latest_checkpoint
from starcoder.training.signals import StopRequest
from starcoder.training.trainer import Trainer
from tests.distributed import World
from tests.training.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
LAYOUT = ("parallel.tensor_parallel=2", "train.micro_batch_size=2", "train.save_every=1")


@pytest.fixture(scope="module")
def world():
    with World(4) as w:
        yield w


def _train(corpus, out, steps):
    trainer = Trainer(tiny_config(corpus, out, *LAYOUT, f"train.max_steps={steps}"))
    try:
        with StopRequest() as stop:
            trainer.run(stop)
    finally:
        trainer.close()
    return trainer.state.step


@contextlib.contextmanager
def _counting_metadata_opens(counts):
    """Counts shard headers opened to read metadata, and manifests read, in this process."""
    real_read, real_open, real_manifest = (HuggingFaceStorageReader.read_metadata,
                                           safetensors.safe_open, checkpoints.read_manifest)
    reading = []

    def read_metadata(self):
        reading.append(True)
        try:
            return real_read(self)
        finally:
            reading.pop()

    def safe_open(*args, **kwargs):
        counts["headers"] += bool(reading)
        return real_open(*args, **kwargs)

    def read_manifest(step_dir):
        counts["manifests"] += 1
        return real_manifest(step_dir)

    HuggingFaceStorageReader.read_metadata, safetensors.safe_open = read_metadata, safe_open
    checkpoints.read_manifest = read_manifest
    import starcoder.training.checkpoint as training_checkpoint
    training_checkpoint.read_manifest = read_manifest
    try:
        yield
    finally:
        HuggingFaceStorageReader.read_metadata, safetensors.safe_open = real_read, real_open
        checkpoints.read_manifest = training_checkpoint.read_manifest = real_manifest


def _metadata_opens_before_and_after(corpus, out):
    step_dir = latest_checkpoint(out)
    before = {"headers": 0, "manifests": 0}
    with _counting_metadata_opens(before):  # what every rank did before: read all headers
        CheckpointReader(step_dir / "dcp").read_metadata()
    after = {"headers": 0, "manifests": 0}
    with _counting_metadata_opens(after):
        trainer = Trainer(tiny_config(corpus, out, *LAYOUT, "train.max_steps=3"))
        trainer.close()
    return before, after, trainer.state.step


def _corrupt_one_rank_shard_then_resume(corpus, out):
    step_dir = latest_checkpoint(out)
    if dist.get_rank() == 0:
        shard = sorted((step_dir / "dcp").iterdir())[-1]  # written by the last rank
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    dist.barrier()
    trainer = Trainer(tiny_config(corpus, out, *LAYOUT, "train.max_steps=3"))
    trainer.close()
    return trainer.state.step, (step_dir.parent / f"{step_dir.name}.corrupt").is_dir()


def test_rank_0_reads_the_metadata_and_a_corrupt_shard_is_set_aside_on_every_rank(world, corpus, tmp_path):
    out = str(tmp_path / "run")
    assert world.run(_train, corpus, out, 2) == [2] * 4
    shards = len(list((latest_checkpoint(out) / "dcp").iterdir()))
    assert shards == 4
    results = world.run(_metadata_opens_before_and_after, corpus, out)
    for rank, (before, after, step) in enumerate(results):
        assert before == {"headers": shards, "manifests": 0}  # O(world) per rank: O(world^2) in all
        assert after == ({"headers": shards, "manifests": 1} if rank == 0 else
                         {"headers": 0, "manifests": 0}), rank
        assert step == 2

    assert world.run(_corrupt_one_rank_shard_then_resume, corpus, out) == [(1, True)] * 4
