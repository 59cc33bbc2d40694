"""The distributed optimizer and bf16 weights against plain AdamW, on one 4-rank and one 2-rank
gloo world: equal losses, resume across optimizers and data-parallel sizes, collectives in the
right dtypes, bytes sent and held equal to the formulas, and reductions overlapping backward.

The model is tests/training/helpers' tiny-sc2 (2 layers x 64, sequence 32, batch 8), 10 steps.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import pytest

from starcoder.data import build_train_loader
from starcoder.parallel.comm_accounting import CommAccounting, memory_bytes_per_param, step_bytes
from starcoder.training.trainer import Trainer, train
from tests.distributed import World
from tests.training.helpers import make_corpus, metrics, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ["train.max_steps=10", "train.save_every=5"]
DIST = "parallel.distributed_optimizer=true"
LAYOUTS = {"dp4": ["train.micro_batch_size=1"],  # 2 micro-batches per rank per step
           "tp2-sp-dp2": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                          "train.micro_batch_size=2"]}
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def world():
    with World(4) as w:
        yield w


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def world2():
    with World(2) as w:
        yield w


def _train(corpus, out, overrides):
    train(tiny_config(corpus, Path(out), *STEPS, *overrides))


def _trainer(corpus, out, overrides) -> tuple[Trainer, object]:
    trainer = Trainer(tiny_config(corpus, Path(out), *overrides))
    g = trainer.grid
    batches = iter(build_train_loader(trainer.cfg, trainer.tokenizer, dp_rank=g.dp_rank,
                                      dp_size=g.dp, consumed_samples=0))
    return trainer, lambda: [next(batches) for _ in range(trainer.accum)]


def series(run, key="loss") -> list[float]:
    return [r[key] for r in metrics(run)]


def close(a, b, rel_tol=REL_TOL) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel_tol) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(world, corpus, tmp_path_factory):
    """Each layout trained with plain AdamW and with the distributed optimizer, fp32."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, sets in LAYOUTS.items():
        for opt, extra in (("adamw", []), ("dist", [DIST])):
            out[name, opt] = root / f"{name}-{opt}"
            world.run(_train, corpus, str(out[name, opt]), [*sets, *extra])
    return out


def test_distributed_optimizer_gives_plain_adamw_losses(runs):
    """DP 4 and TP 2 x SP x DP 2 (DP 2 alone: tests/training/test_data_parallel.py). The
    reduce-scatter sums in another order than DDP's all-reduce and the norm is summed over shards,
    so equality is to 1e-5 relative, not bit for bit."""
    for name in LAYOUTS:
        plain, dist = runs[name, "adamw"], runs[name, "dist"]
        assert len(series(plain)) == 10 and series(plain)[-1] < series(plain)[0] - 1.0, name
        assert close(series(dist), series(plain)), name
        assert close(series(dist, "grad_norm"), series(plain, "grad_norm")), name


def _resume(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    (dest / "checkpoints/latest").write_text("step_0000005\n")
    return dest


def test_a_dp4_distributed_checkpoint_resumes_at_dp2_and_without_it(runs, world2, corpus, tmp_path):
    source = runs["dp4", "dist"]
    targets = {"dp2-dist": (world2, ["train.micro_batch_size=2", DIST]),
               "dp2-adamw": (world2, ["train.micro_batch_size=2"]),
               "dp1-adamw": (None, ["train.micro_batch_size=4"])}
    for name, (w, sets) in targets.items():
        run = _resume(source, tmp_path / name)
        if w is None:
            _train(corpus, str(run), sets)
        else:
            w.run(_train, corpus, str(run), sets)
        assert series(run)[:5] == series(source)[:5], name
        assert close(series(run)[5:], series(source)[5:]), name
        assert close(series(run, "grad_norm")[5:], series(source, "grad_norm")[5:]), name


def _dtypes(corpus, out, overrides):
    """One bf16 step's collectives as {(group, kind): dtypes}, the weights' dtypes, and the dtype
    of every block's output (the residual stream)."""
    trainer, batch = _trainer(corpus, out, overrides)
    residual = set()
    for block in trainer.model.blocks.values():
        block.register_forward_hook(lambda _m, _a, y: residual.add(str(y.dtype)))
    g = trainer.grid
    accounting = CommAccounting({"tp": g.group("tp"), "dp": g.group("dp")})
    with accounting:
        trainer.train_step(batch(), 1e-3)
    trainer.close()
    seen: dict = {}
    for call in accounting.calls:
        seen.setdefault(f"{call.group} {call.kind} {call.numel}", set()).add(str(call.dtype))
    return seen, {str(p.dtype) for p in trainer.model.parameters()}, residual


def test_bf16_where_it_should_be_and_fp32_where_it_must(world, corpus, tmp_path):
    sets = [*LAYOUTS["tp2-sp-dp2"], "train.precision=bf16", DIST]
    seen, weights, residual = world.run(_dtypes, corpus, str(tmp_path / "run"), sets)[0]
    assert weights == residual == {"torch.bfloat16"}
    b, s, h = 2, 32, 64
    bf16, fp32 = {"torch.bfloat16"}, {"torch.float32"}
    # Every sequence-parallel activation collective: [b, s, h], bf16.
    assert seen[f"tp all_gather {b * s * h}"] == seen[f"tp reduce_scatter {b * s * h}"] == bf16
    # The gradient reduce-scatter is fp32, the weight all-gather bf16 (one bucket here).
    dp = {k: v for k, v in seen.items() if k.startswith("dp ")}
    assert [v for k, v in dp.items() if "reduce_scatter" in k] == [fp32]
    assert [v for k, v in dp.items() if "all_gather" in k] == [bf16]
    # Cross-entropy statistics (b x s row maxima; sums and targets), replicated gradients
    # (LayerNorms, row-parallel biases: 2 x (4 x 64 + 2 x 64) + 2 x 64) and the norm: fp32.
    for numel in (b * s, 2 * b * s, 2 * (4 * h + 2 * h) + 2 * h, 1):
        assert seen[f"tp all_reduce {numel}"] == fp32, numel
    assert seen["dp all_reduce 1"] == {"torch.float32", "torch.float64"}  # norm; loss, tokens
    assert all(v == fp32 for k, v in seen.items() if k.startswith("world"))


def _accounting(corpus, out, overrides):
    """A second step's bytes sent by (group, kind), bytes held, and what the formulas need."""
    trainer, batch = _trainer(corpus, out, overrides)
    trainer.train_step(batch(), 1e-3)
    g = trainer.grid
    accounting = CommAccounting({"tp": g.group("tp"), "dp": g.group("dp")})
    with accounting:
        trainer.train_step(batch(), 1e-3)
    trainer.close()
    psi = sum(bucket.numel for bucket in trainer.optimizer.buffer.buckets)
    replicated = sum(p.numel() for p in trainer.model.parameters() if getattr(p, "partial_grad", False))
    return accounting.sent(), trainer.optimizer.memory_bytes(), psi, replicated, trainer.accum


@pytest.mark.parametrize("sets", [
    ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "train.precision=bf16", DIST],
    ["parallel.tensor_parallel=2", "train.precision=bf16"],
], ids=["tp2-sp-dp2-bf16-dist", "tp2-dp2-bf16-ddp"])
def test_bytes_sent_and_held_equal_the_formulas(world, corpus, tmp_path, sets):
    sent, held, psi, replicated, accum = world.run(
        _accounting, corpus, str(tmp_path / "run"), [*sets, "train.micro_batch_size=2"])[0]
    distributed, sp = DIST in sets, "parallel.sequence_parallel=true" in sets
    expected = step_bytes(psi=psi, replicated=replicated, b=2, s=32, h=64, layers=2,
                          micro_batches=accum, tp=2, dp=2, sp=sp, distributed=distributed)
    assert sent.keys() == expected.keys()
    for key, nbytes in expected.items():
        assert math.isclose(sent[key], nbytes, rel_tol=0.01), (key, sent[key], nbytes)
    assert sum(held.values()) == psi * memory_bytes_per_param(2, distributed)  # exact


def _overlap(corpus, out, overrides):
    """Per step: each bucket's reduction launch time, relative to the end of backward."""
    trainer, batch = _trainer(corpus, out, overrides)
    buffer, steps = trainer.optimizer.buffer, []
    finish = buffer.finish_grad_sync

    def timed_finish():  # train_step calls it right after the last backward
        end = time.perf_counter()
        steps.append([None if b.launched_at is None else b.launched_at - end for b in buffer.buckets])
        return finish()

    buffer.finish_grad_sync = timed_finish
    for _ in range(2):
        trainer.train_step(batch(), 1e-3)
    trainer.close()
    return steps, len(buffer.buckets)


def test_reduce_scatters_start_while_backward_runs(world, corpus, tmp_path):
    """With 0.05 MB buckets (several at this size), the first buckets' reduce-scatters are launched from the
    backward hooks well before backward ends; only the last bucket (the embedding, whose
    gradient comes last) is launched at the very end."""
    sets = ["train.micro_batch_size=2", DIST, "parallel.ddp_bucket_mb=0.05"]
    per_rank = world.run(_overlap, corpus, str(tmp_path / "run"), sets)
    for offsets, buckets in per_rank:
        assert buckets >= 4
        for launches in offsets:
            assert all(t is not None and t <= 0 for t in launches)
            assert sum(t < -1e-3 for t in launches) >= buckets - 2  # > 1 ms before the end


def _gather_in_flight(corpus, out, overrides):
    """After a step with `overlap_param_gather`: are the buckets' gathers in flight before the
    next forward, and finished after it?"""
    trainer, batch = _trainer(corpus, out, overrides)
    trainer.train_step(batch(), 1e-3)
    buckets = trainer.optimizer.buffer.buckets
    before = [b.gather is not None for b in buckets]
    tokens = batch()[0]["tokens"]
    trainer.model(tokens[:, :-1], tokens[:, 1:])
    after = [b.gather is not None for b in buckets]
    trainer.close()
    return before, after


def test_overlapping_the_weight_gather_with_forward_changes_nothing(runs, world, corpus, tmp_path):
    """`parallel.overlap_param_gather`: the step leaves each bucket's all-gather in flight and
    each module waits for its own bucket in the next forward (0.05 MB buckets); losses unchanged."""
    sets = [*LAYOUTS["dp4"], DIST, "parallel.overlap_param_gather=true", "parallel.ddp_bucket_mb=0.05"]
    for before, after in world.run(_gather_in_flight, corpus, str(tmp_path / "flight"), sets):
        assert len(before) > 1 and all(before) and not any(after)
    run = tmp_path / "overlap"
    world.run(_train, corpus, str(run), sets)
    assert close(series(run), series(runs["dp4", "dist"]))
