"""Four ranks, one gloo world for the module. Checkpoint verification at TP 2 x DP 2: rank 0 alone
opens the manifest and the shard headers and broadcasts them, and a corrupt shard written by
one rank sets the checkpoint aside on every rank alike. fp16 loss scaling at DP 4: each rank
scales its own share of the tokens."""

from __future__ import annotations

import contextlib

import pytest
import safetensors
import torch.distributed as dist
from torch.distributed.checkpoint import HuggingFaceStorageReader

from starcoder.convert import checkpoints
from starcoder.convert.checkpoints import CheckpointReader, latest_checkpoint
from starcoder.data import build_train_loader
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


def _activation_grad_of_first_micro_batch(corpus, out, *sets):
    """Mean |gradient| reaching the last MLP's fp16 output in the first micro-batch of one step."""
    cfg = tiny_config(corpus, out, "train.precision=fp16", "train.initial_loss_scale=1024",
                      "train.micro_batch_size=2", *sets)
    trainer = Trainer(cfg)
    seen = []

    def watch(module, args, output):
        if isinstance(output, tuple):  # (GEMM output, bias unapplied): the block fuses the add
            output = output[0]
        output.register_hook(lambda g: seen.append((str(g.dtype), g.float().abs().mean().item())))

    handle = trainer.model.get_submodule("blocks.1.mlp.fc_out").register_forward_hook(watch)
    batches = build_train_loader(cfg, trainer.tokenizer, dp_rank=trainer.grid.dp_rank,
                                 dp_size=trainer.grid.dp, consumed_samples=0)
    trainer.train_step([next(batches) for _ in range(trainer.accum)], 1e-3)
    handle.remove()
    trainer.close()
    return seen[0]


def test_fp16_loss_scale_does_not_shrink_with_the_data_parallel_size(world, corpus, tmp_path):
    """At DP 4 each rank's backward is scaled by the loss scale over its own tokens, as Megatron
    does: rank 0's first micro-batch gets the same gradients as one process training on that
    micro-batch alone. Dividing the scale by the global token count made them 4x smaller here
    (and, at StarCoder2-15B's 4M-token batches, flushed 43% of fp16 logit gradients to zero)."""
    ranks = world.run(_activation_grad_of_first_micro_batch, corpus, str(tmp_path / "dp4"),
                      "train.global_batch_size=8")
    alone = _activation_grad_of_first_micro_batch(corpus, tmp_path / "one", "train.global_batch_size=2")
    assert ranks[0][0] == alone[0] == "torch.float16"
    assert ranks[0][1] == pytest.approx(alone[1], rel=1e-3)
