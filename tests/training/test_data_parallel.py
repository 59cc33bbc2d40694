"""Two gloo ranks against one process: the same losses for the same global batch (data or tensor
parallel), checkpoints that resume on the other layout, ZeRO-1, and non-finite agreement. One
world serves the whole module."""

import math
import shutil
from pathlib import Path

import pytest
import torch

from starcoder.config import ConfigError
from starcoder.models import gpt
from starcoder.training.trainer import train
from tests.distributed import World
from tests.training.helpers import close, losses, metrics, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    with World(2) as w:
        yield w


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, 4 steps of 8 samples as 2 micro-batches of 4, a checkpoint every 2 steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(corpus, run, "train.save_every=2"))
    return run


def _train(corpus, out, overrides):
    return train(tiny_config(corpus, Path(out), *overrides)).step


def _train_error(corpus, out, overrides):
    try:
        train(tiny_config(corpus, Path(out), *overrides))
    except ConfigError as err:
        return str(err)


def _resume_from(source: Path, step: int, dest: Path) -> Path:
    """A copy of a run rolled back to its checkpoint at `step`."""
    shutil.copytree(source, dest)
    (dest / "checkpoints/latest").write_text(f"step_{step:07d}\n")
    return dest


def test_two_ranks_give_the_single_process_losses(world, corpus, reference, tmp_path):
    # 2 ranks x 2 micro-batches of 2 = the same global batch of 8
    world.run(_train, corpus, str(tmp_path / "dp"), ["train.micro_batch_size=2"])
    assert close(losses(tmp_path / "dp"), losses(reference), 1e-5)
    assert losses(tmp_path / "dp") != losses(reference)  # really computed apart, not copied

    world.run(_train, corpus, str(tmp_path / "zero"),
              ["train.micro_batch_size=2", "parallel.distributed_optimizer=true"])
    # The distributed optimizer at DP 2: these 4 steps give the same losses bit for bit; the norm,
    # summed over shards in another order, is equal to 1e-5 relative.
    assert losses(tmp_path / "zero") == losses(tmp_path / "dp")
    grad_norms = [r["grad_norm"] for r in metrics(tmp_path / "zero")]
    assert all(math.isclose(a, r["grad_norm"], rel_tol=1e-5)
               for a, r in zip(grad_norms, metrics(tmp_path / "dp"), strict=True))


def test_checkpoints_resume_on_the_other_layout(world, corpus, reference, tmp_path):
    # one process -> two ranks with the distributed optimizer
    run = _resume_from(reference, 2, tmp_path / "one_to_two")
    world.run(_train, corpus, str(run), ["train.micro_batch_size=2", "parallel.distributed_optimizer=true",
                                         "train.save_every=2"])
    assert losses(run)[:2] == losses(reference)[:2]
    assert close(losses(run), losses(reference), 1e-5)

    # two ranks (ZeRO state sharded over them) -> one process
    back = _resume_from(run, 2, tmp_path / "two_to_one")
    train(tiny_config(corpus, back))
    assert close(losses(back), losses(reference), 1e-5)


def _train_with_nan_on_rank_one(corpus, out):
    """Rank 1 alone produces a NaN loss in step 2; returns the skipped steps this rank counted."""
    calls = {"n": 0}
    real = gpt.OutputLayer.forward

    def poisoned(self, h, weight, labels=None):
        out = real(self, h, weight, labels)
        calls["n"] += 1
        nan = torch.distributed.get_rank() == 1 and calls["n"] == 3  # step 2, first micro-batch
        return out * float("nan") if nan else out

    gpt.OutputLayer.forward = poisoned
    try:
        return train(tiny_config(corpus, Path(out), "train.micro_batch_size=2", "train.max_steps=3")).skipped_steps
    finally:
        gpt.OutputLayer.forward = real


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_all(world, corpus, tmp_path):
    out = tmp_path / "nan"
    assert world.run(_train_with_nan_on_rank_one, corpus, str(out)) == [1, 1]
    records = metrics(out)  # rank 0's own loss was finite: it skipped on the all-reduced one
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert records[1]["loss"] is None


def test_a_global_batch_that_does_not_divide_names_the_key(world, corpus, tmp_path):
    errors = world.run(_train_error, corpus, str(tmp_path / "bad"), ["train.micro_batch_size=8"])
    assert errors[0] == errors[1] == ("train.global_batch_size: 8 is not divisible by "
                                      "train.micro_batch_size x data-parallel size (8 x 2)")


@pytest.mark.parametrize("model", [[], ["model.num_query_groups=1"]], ids=["gqa", "mqa"])
def test_tensor_parallel_gives_the_single_process_losses_and_checkpoints(world, corpus, tmp_path, model):
    """tp 2 (with 1 KV head: both ranks hold it, their gradients summed), with and without
    sequence parallel; checkpoints move between tp 2 and one process both ways."""
    reference = tmp_path / "reference"
    train(tiny_config(corpus, reference, "train.save_every=2", *model))
    tp = ["parallel.tensor_parallel=2", "train.save_every=2", *model]
    world.run(_train, corpus, str(tmp_path / "tp"), tp)
    assert close(losses(tmp_path / "tp"), losses(reference), 1e-5)
    world.run(_train, corpus, str(tmp_path / "sp"), [*tp, "parallel.sequence_parallel=true"])
    assert close(losses(tmp_path / "sp"), losses(reference), 1e-5)

    back = _resume_from(tmp_path / "tp", 2, tmp_path / "tp_to_one")
    train(tiny_config(corpus, back, *model))
    assert close(losses(back), losses(reference), 1e-5)
    run = _resume_from(reference, 2, tmp_path / "one_to_tp")
    world.run(_train, corpus, str(run), tp)
    assert close(losses(run), losses(reference), 1e-5)


@pytest.mark.parametrize("normalisation", ["token", "example"])
def test_two_ranks_give_the_single_process_sft_losses(world, sft_corpus, tmp_path, normalisation):
    """The loss mask's weights (per-example ones included) are normalised over the global batch:
    DP 2 and TP 2 (both ranks see the whole mask, the loss is computed on the split vocabulary)
    equal one process."""
    sft = ["data.fim_rate=0", "train.objective=sft", "data.split=100,0,0",
           f"train.loss_normalization={normalisation}"]
    train(tiny_config(sft_corpus, tmp_path / "one", *sft))
    world.run(_train, sft_corpus, str(tmp_path / "dp"), [*sft, "train.micro_batch_size=2"])
    assert close(losses(tmp_path / "dp"), losses(tmp_path / "one"), 1e-6)
    assert losses(tmp_path / "dp") != losses(tmp_path / "one")  # really computed apart
    world.run(_train, sft_corpus, str(tmp_path / "tp"), [*sft, "parallel.tensor_parallel=2"])
    assert close(losses(tmp_path / "tp"), losses(tmp_path / "one"), 1e-6)
    tp_norms, one_norms = ([r["grad_norm"] for r in metrics(tmp_path / run)] for run in ("tp", "one"))
    assert close(tp_norms, one_norms, 1e-6)
    assert tp_norms != one_norms  # the sharded gradients really were computed apart
