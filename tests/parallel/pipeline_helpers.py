"""Shared pieces of the pipeline tests (`test_pipeline*.py`): the cut-down configs, a trainer run
on one rank that returns its trained parameters, and comparisons.

tiny-sc2 (GQA, RoPE, window 16) cut to 4 layers x 64 with an untied output layer: micro-batches
keep their order through 1f1b, gpipe and interleaved, so PP alone is bit-identical to one
process. tiny-sc1 (MQA, learned positions) keeps its tied output layer: the first stage's and the
last stage's gradient of the word embedding are summed once per step instead of once per
micro-batch, so the sums differ in rounding (1e-6 relative). Global batch 8 of micro-batch 1: 8
micro-batches per step at DP 1, 4 at DP 2, at least 2P for every case.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from starcoder.config import load_config
from tests.parallel.common import trained_parameters
from tests.training.helpers import metrics

SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.ffn_hidden_size=128", "train.seq_length=32", "train.global_batch_size=8",
         "train.micro_batch_size=1", "train.max_steps=10", "train.save_every=5",
         "train.eval_every=5", "train.eval_steps=1", "data.split=90,10,0",
         "train.warmup_steps=2", "train.lr_decay_steps=20", "train.lr=3e-3", "log.every=1",
         "log.tensorboard=false", "log.progress_bar=false", "data.num_workers=0"]
PRESET_SETS = {"tiny-sc1": [], "tiny-sc2": ["model.sliding_window=16", "model.tie_word_embeddings=false"]}

TOL = 1e-5  # with TP or DP: losses absolute, gradient norms relative
PP_TOL = 1e-6  # PP alone, where the sums' order changes (tied embeddings, zero-bubble)


def config(preset: str, corpus: str, out, *overrides: str):
    return load_config(preset, [*SMALL, *PRESET_SETS[preset], f"data.paths=[{corpus}]",
                                f"train.output_dir={out}", *overrides])


def layout(tp: int, pp: int, *more: str, sp: bool = False) -> list[str]:
    return [f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
            f"parallel.sequence_parallel={str(sp).lower()}", *more]


def train_rank(preset: str, corpus: str, out: str, overrides: list[str]) -> dict:
    """The trainer on this rank; returns {name: (this rank's slices as (start, stop) pairs,
    tensor)} of its trained parameters."""
    trained = trained_parameters(config(preset, corpus, out, *overrides))
    return {name: (slices, tensor) for name, (_, slices, tensor) in trained.items()}


def train_losses(run) -> list[float]:
    return [r["loss"] for r in metrics(run) if "loss" in r]


def grad_norms(run) -> list[float]:
    return [r["grad_norm"] for r in metrics(run) if "grad_norm" in r]


def val_losses(run) -> list[float]:
    return [r["val_loss"] for r in metrics(run) if "val_loss" in r]


def close(a, b, abs_tol=0.0, rel_tol=0.0) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=abs_tol, rel_tol=rel_tol)
                                    for x, y in zip(a, b))


def matches(run, ref, tol: float, validation: bool = True) -> bool:
    """Losses (absolute), gradient norms and validation losses (relative) within `tol`;
    tol 0 means bit for bit."""
    return (close(train_losses(run), train_losses(ref), abs_tol=tol)
            and close(grad_norms(run), grad_norms(ref), rel_tol=tol)
            and (not validation or (close(val_losses(run), val_losses(ref), rel_tol=tol)
                                    and len(val_losses(ref)) == 2)))


def copies_differ(per_rank: list[dict]) -> list[str]:
    """Parameters held by several ranks (tied embedding copies, data- and tensor-parallel
    replicas) that are not bit-identical on all of them."""
    holders: dict = {}
    for rank, params in enumerate(per_rank):
        for name, (slices, tensor) in params.items():
            holders.setdefault((name, slices), []).append((rank, tensor))
    return [f"{name} ranks {[r for r, _ in copies]}" for (name, _), copies in holders.items()
            if any(not t.equal(copies[0][1]) for _, t in copies[1:])]


def resume_from(source: Path, step: int, dest: Path) -> Path:
    """A copy of a run rolled back to its checkpoint at `step`."""
    shutil.copytree(source, dest)
    (dest / "checkpoints/latest").write_text(f"step_{step:07d}\n")
    return dest
