"""`starcoder train` under pipeline parallelism alone (2 ranks) equals the single-process run:
every schedule, virtual stages, uneven stages, validation through the pipeline, tied copies.
One 2-rank gloo world serves the module."""

from __future__ import annotations

import pytest

from starcoder.config import ConfigError, load_config
from starcoder.training.trainer import train
from tests.distributed import World
from tests.parallel.pipeline_helpers import (PP_TOL, config, copies_differ, layout, matches,
                                             train_losses, train_rank)
from tests.training.helpers import make_corpus, metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# name: (preset, parallel settings, bit-identical to one process); the reference is the preset in
# one process with the settings that are not parallel.*
CASES = {
    "1f1b": ("tiny-sc2", layout(1, 2, "parallel.pipeline_schedule=1f1b"), True),
    "gpipe": ("tiny-sc2", layout(1, 2, "parallel.pipeline_schedule=gpipe"), True),
    "interleaved-v2": ("tiny-sc2", layout(1, 2, "parallel.virtual_pipeline=2"), True),
    "uneven-1-3": ("tiny-sc2", layout(1, 2, "parallel.pipeline_layers=[1,3]"), True),
    "zero-bubble-v1": ("tiny-sc2", layout(1, 2, "parallel.pipeline_schedule=zero_bubble"), False),
    "zbv-v2": ("tiny-sc2", layout(1, 2, "parallel.pipeline_schedule=zero_bubble",
                                  "parallel.virtual_pipeline=2", "train.eval_every=0"), False),
    "tied-1f1b": ("tiny-sc1", layout(1, 2), False),
    "tied-interleaved-v2": ("tiny-sc1", layout(1, 2, "parallel.virtual_pipeline=2"), False),
    "recompute-full": ("tiny-sc2", layout(1, 2, "model.recompute=full"), True),
    "recompute-selective": ("tiny-sc2", layout(1, 2, "model.recompute=selective"), True),
    # full on the first block of each of the rank's two chunks
    "recompute-layers-v2": ("tiny-sc2", layout(1, 2, "parallel.virtual_pipeline=2", "model.recompute=full",
                                               "model.recompute_layers=1"), True),
    "fp16-loss-scale": ("tiny-sc2", layout(1, 2, "train.precision=fp16",
                                           "train.initial_loss_scale=1024"), False),
}


FP16_TOL = 1e-3


def reference_sets(name: str) -> tuple[str, ...]:
    # Recomputation changes no number: its cases compare with the run that recomputes nothing.
    return tuple(x for x in CASES[name][1] if not x.startswith(("parallel.", "model.recompute")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process runs of both presets and every case's run (10 steps)."""
    root = tmp_path_factory.mktemp("pp2")
    corpus = make_corpus(root / "corpus")
    out = {}
    for name, (preset, _, _) in CASES.items():
        key = preset, reference_sets(name)
        if key not in out:
            out[key] = root / f"reference-{len(out)}"
            train(config(preset, corpus, out[key], *key[1]))
    with World(2) as world:
        for name, (preset, sets, _) in CASES.items():
            out[name] = root / name, world.run(train_rank, preset, corpus, str(root / name), sets)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_gives_the_single_process_numbers(runs, name):
    preset, _, exact = CASES[name]
    folder, _ = runs[name]
    ref = runs[preset, reference_sets(name)]
    assert train_losses(ref)[-1] < train_losses(ref)[0] - 1.0  # it does train
    if name == "fp16-loss-scale":  # the scaled loss went through the schedule
        assert [r["loss_scale"] for r in metrics(folder) if "loss_scale" in r][-1] == 1024.0
    # fp16 holds the weights themselves in fp16 (fp32 main weights in the optimizer): the
    # stages' partial gradient norms are summed in another order than one process sums them,
    # and a last-bit difference in the clip factor moves an fp16 weight by one of its ulps.
    tol = FP16_TOL if name == "fp16-loss-scale" else PP_TOL
    assert matches(folder, ref, 0.0 if exact else tol, validation=name != "zbv-v2")


@pytest.mark.parametrize("name", ["tied-1f1b", "tied-interleaved-v2", "1f1b"])
def test_copies_stay_bit_identical(runs, name):
    _, per_rank = runs[name]
    assert copies_differ(per_rank) == []
    if name.startswith("tied"):  # the word embedding is on both ranks, the positions on one
        held = [("embedding.word.weight" in p, "embedding.position.weight" in p) for p in per_rank]
        assert held == [(True, True), (True, False)]


def test_stages_hold_their_own_blocks_under_global_names(runs):
    _, (rank0, rank1) = runs["uneven-1-3"]
    assert {n.split(".")[1] for n in rank0 if n.startswith("blocks.")} == {"0"}
    assert {n.split(".")[1] for n in rank1 if n.startswith("blocks.")} == {"1", "2", "3"}
    assert "head.weight" in rank1 and "head.weight" not in rank0
    _, (zbv0, zbv1) = runs["zbv-v2"]  # V placement: rank 0 holds stages 0 and 3
    assert {n.split(".")[1] for n in zbv0 if n.startswith("blocks.")} == {"0", "3"}


@pytest.mark.parametrize("sets, key", [
    (["parallel.pipeline_parallel=3"], "parallel.pipeline_parallel"),
    (["parallel.pipeline_parallel=2", "parallel.pipeline_layers=[1,1]"], "parallel.pipeline_layers"),
    (["parallel.pipeline_parallel=2", "parallel.pipeline_layers=[4,0]"], "parallel.pipeline_layers"),
    (["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=interleaved"], "parallel.pipeline_schedule"),
    (["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2",
      "parallel.pipeline_schedule=1f1b"], "parallel.pipeline_schedule"),
    (["parallel.virtual_pipeline=2"], "parallel.virtual_pipeline"),
    (["parallel.pipeline_schedule=zigzag"], "parallel.pipeline_schedule"),
])
def test_impossible_layouts_name_the_key(sets, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        load_config("tiny-sc2", sets)
