"""DPO under tensor parallelism and data parallelism equals the single-process run: per-step
loss, gradient norm and TRL metrics within 1e-6 (rewards relative to their log-probs), the same
for the validation after every step (DPO loss and metrics on the 4 held-out pairs, each rank
scoring its share), and with LoRA the trained adapters (1e-5).

One 2-rank gloo world serves the module: TP 2 (the policy and the frozen reference both split,
vocab-parallel log-probs), DP 2 (pairs split over ranks, the loss a mean over the global batch's
pairs), DP 2 with the reference precomputed (its pass split over the ranks, then summed) and the
distributed optimizer, and TP 2 with sequence parallelism and LoRA (the reference is the base
under `adapters_off`). tiny-sc2 cut down to 2 layers x 64; two micro-batches per rank per step
at DP 2 (gradient accumulation), four in one process.
"""

from __future__ import annotations

import math

import pytest
import torch

from starcoder.finetune.dpo import METRICS
from starcoder.config import load_config
from starcoder.convert.lora import is_lora
from tests.distributed import World
from tests.models import write_tiny_model
from tests.parallel.common import trained_parameters
from tests.parallel.test_training import assemble
from tests.training.helpers import make_preference_corpus, metrics

MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.ffn_hidden_size=128"]
SETS = ["train.objective=dpo", "finetune.dpo_label_smoothing=0.1", "train.seq_length=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=3",
        "train.warmup_steps=0", "train.lr=1e-2", "train.min_lr=0", "data.fim_rate=0",
        "data.split=75,25,0", "train.eval_every=1", "train.eval_steps=1", "log.every=1",
        "log.tensorboard=false", "log.progress_bar=false", "data.num_workers=0"]
LORA = ["finetune.lora_rank=4", "finetune.lora_alpha=8",
        "finetune.lora_targets=[q_proj, kv_proj, out_proj, fc_in, fc_out]"]
LAYOUTS = {"tp2": (["parallel.tensor_parallel=2"], []),
           "dp2": ([], []),
           "dp2-precomputed-distopt": (["finetune.dpo_reference=precomputed",
                                        "parallel.distributed_optimizer=true"], []),
           "tp2-sp-lora": (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], LORA)}
VAL_KEYS = ("val_loss", *(f"val_{name}" for name in METRICS))
TOL = 1e-6
BETA = 0.1  # finetune.dpo_beta's default

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    with World(2) as w:
        yield w


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_preference_corpus(tmp_path_factory.mktemp("prefs"))


def config(base, corpus, out, *overrides):
    return load_config("tiny-sc2", [*MODEL, *SETS, f"train.init_from={base}",
                                    f"data.paths=[{corpus}]", f"train.output_dir={out}", *overrides])


def _train(base, corpus, out, overrides):
    return trained_parameters(config(base, corpus, out, *overrides))


def scale(record: dict, key: str) -> float:
    """What a metric's error is relative to: a reward is beta x a difference of summed log-probs
    (about -50 here) that fp32 knows only relative to their size (a reduction in another order,
    as at TP 2, moves a reward of 0.08 by 1e-6); the validation loss, a function of the reward
    margin with a slope below 1, the same (TP 2 measured 8e-7 off in 0.72); the others are relative
    to themselves (or 1)."""
    prefix = "val_" if key.startswith("val_") else ""
    if key == "val_loss" or (key.startswith(prefix + "rewards/")
                             and key != prefix + "rewards/accuracies"):
        return BETA * max(abs(record[f"{prefix}logps/{side}"]) for side in ("chosen", "rejected"))
    return 1.0


def test_tp2_and_dp2_dpo_runs_equal_one_process(world, corpus, tmp_path):
    base = write_tiny_model(tmp_path / "base", "tiny-sc2", MODEL, std=0.05)["native"]
    references = {}
    for layout, (sets, extra) in LAYOUTS.items():
        key = tuple(extra)
        if key not in references:
            out = tmp_path / f"one{len(references)}"
            references[key] = trained_parameters(config(base, corpus, out, *extra)), metrics(out)
            assert any(abs(r["rewards/margins"]) > 1e-3 for r in references[key][1] if "lr" in r)
            assert all(abs(r["val_rewards/margins"]) > 1e-4
                       for r in references[key][1] if "val_loss" in r)  # not vacuous
        reference, ref_metrics = references[key]
        per_rank = world.run(_train, str(base), corpus, str(tmp_path / layout), [*sets, *extra])
        got = metrics(tmp_path / layout)
        assert len(got) == len(ref_metrics) == 6  # 3 steps, each with its validation
        for kind, keys in (("lr", ("loss", "grad_norm", *METRICS)), ("val_loss", VAL_KEYS)):
            mine = [r for r in got if kind in r]
            ref = [r for r in ref_metrics if kind in r]
            assert [r["step"] for r in mine] == [r["step"] for r in ref] == [1, 2, 3]
            for key_ in keys:
                assert all(math.isclose(a[key_], b[key_], rel_tol=TOL, abs_tol=TOL * scale(b, key_))
                           for a, b in zip(mine, ref)), \
                    (layout, key_, [(a[key_], b[key_]) for a, b in zip(mine, ref)])
        # The adapters after 3 steps (measured 1.0e-6 at most): not full weights, where Adam
        # turns unused embedding rows' 1e-12 gradient differences into steps of lr.
        if extra:
            trained = assemble(per_rank)
            adapters = [n for n in trained if is_lora(n)]
            assert adapters
            for name in adapters:
                assert torch.allclose(trained[name], reference[name][2], atol=10 * TOL, rtol=0), \
                    (layout, name, (trained[name] - reference[name][2]).abs().max())
