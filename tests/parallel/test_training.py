"""`starcoder train` under tensor (and sequence) parallelism equals the single-process run.

One 4-rank gloo world serves the module. The trainer lays data parallel over what tensor parallel
leaves, so TP 4 runs as TP 4 x DP 1 and TP 2 as TP 2 x DP 2 (the issue's TP x DP case, with the
data split over two replicas). The reference is the same config trained in this process.
tiny-sc1 (MQA: its KV head is copied on every TP rank) and tiny-sc2 (2 KV heads: split at TP 2,
shared by pairs of ranks at TP 4), cut down to 2 layers x 64 (head dim 16) so ten steps take
about a second.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import starcoder
from starcoder.cli import main as starcoder_main
from starcoder.config import load_config
from starcoder.convert.checkpoints import iter_checkpoint_weights, latest_checkpoint, read_state
from starcoder.training.trainer import train
from tests.distributed import World
from tests.parallel.common import trained_parameters
from tests.training.helpers import make_corpus, metrics

SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.ffn_hidden_size=128", "train.seq_length=32", "train.global_batch_size=8",
         "train.micro_batch_size=2", "train.max_steps=10", "train.save_every=5",
         "train.warmup_steps=2", "train.lr_decay_steps=20", "train.lr=3e-3", "log.every=1",
         "log.tensorboard=false", "log.progress_bar=false", "data.num_workers=0"]
PRESET_SETS = {"tiny-sc1": [], "tiny-sc2": ["model.sliding_window=16"]}  # the window bites at 32
LAYOUTS = [(tp, sp) for tp in (2, 4) for sp in (False, True)]

LOSS_TOL = 1e-5  # absolute, on losses of 9 down to 7.5 (measured: up to 7e-7)
NORM_TOL = 1e-5  # relative (measured: up to 7e-7)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    with World(4) as w:
        yield w


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def config(preset: str, corpus: str, out, *overrides: str):
    return load_config(preset, [*SMALL, *PRESET_SETS[preset], f"data.paths=[{corpus}]",
                                f"train.output_dir={out}", *overrides])


def layout_sets(tp: int, sp: bool) -> list[str]:
    return [f"parallel.tensor_parallel={tp}", f"parallel.sequence_parallel={str(sp).lower()}"]


def _train(preset: str, corpus: str, out: str, overrides: list[str]) -> dict:
    """`train()` on this rank, keeping the trainer to return its trained parameters:
    {name: (full shape, this rank's slices as (start, stop) pairs, tensor)}."""
    return trained_parameters(config(preset, corpus, out, *overrides))


def assemble(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Full tensors from the ranks' shards (padded vocabulary rows included)."""
    full = {}
    for params in per_rank:
        for name, (shape, slices, tensor) in params.items():
            full.setdefault(name, torch.full(shape, math.nan))[tuple(slice(*s) for s in slices)] = tensor
    return full


def losses(run) -> list[float]:
    return [r["loss"] for r in metrics(run)]


def grad_norms(run) -> list[float]:
    return [r["grad_norm"] for r in metrics(run)]


def close(a, b, abs_tol=0.0, rel_tol=0.0) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=abs_tol, rel_tol=rel_tol)
                                    for x, y in zip(a, b))


def resume_from(source: Path, step: int, dest: Path) -> Path:
    """A copy of a run rolled back to its checkpoint at `step` (it drops later metrics itself)."""
    shutil.copytree(source, dest)
    (dest / "checkpoints/latest").write_text(f"step_{step:07d}\n")
    return dest


@pytest.fixture(scope="module", params=sorted(PRESET_SETS))
def runs(request, world, corpus, tmp_path_factory):
    """The single-process run and the four layouts' runs of one preset (10 steps, checkpoints at
    5 and 10): {"preset", "root", "reference": folder, (tp, sp): (folder, per-rank parameters)}."""
    preset = request.param
    root = tmp_path_factory.mktemp(preset)
    out = {"preset": preset, "root": root, "reference": root / "reference"}
    train(config(preset, corpus, out["reference"]))
    for tp, sp in LAYOUTS:
        folder = root / f"tp{tp}{'-sp' if sp else ''}"
        out[tp, sp] = folder, world.run(_train, preset, corpus, str(folder), layout_sets(tp, sp))
    return out


def test_every_layout_gives_the_single_process_losses_and_grad_norms(runs):
    ref = runs["reference"]
    assert len(losses(ref)) == 10 and losses(ref)[-1] < losses(ref)[0] - 1.0  # it does train
    for tp, sp in LAYOUTS:
        folder, _ = runs[tp, sp]
        where = f"{runs['preset']} tp {tp} sp {sp}"
        world = read_state(latest_checkpoint(folder))["world"]
        assert (world["tp"], world["dp"]) == (tp, 4 // tp), where  # TP 2 is TP 2 x DP 2
        assert close(losses(folder), losses(ref), abs_tol=LOSS_TOL), where
        assert close(grad_norms(folder), grad_norms(ref), rel_tol=NORM_TOL), where


def test_replicated_parameters_stay_bit_identical_on_the_ranks_that_hold_them(runs):
    """After ten steps, every tensor held by several ranks (LayerNorms, row-parallel biases,
    positions and copied KV heads on the TP ranks; everything on data-parallel replicas) is the
    same bit for bit on each of them."""
    for tp, sp in LAYOUTS:
        _, per_rank = runs[tp, sp]
        holders: dict = {}
        for rank, params in enumerate(per_rank):
            for name, (_, slices, tensor) in params.items():
                holders.setdefault((name, slices), []).append((rank, tensor))
        for (name, _), copies in holders.items():
            first_rank, first = copies[0]
            for rank, tensor in copies[1:]:
                assert torch.equal(tensor, first), \
                    f"{runs['preset']} tp {tp} sp {sp}: {name} differs on ranks {first_rank} and {rank}"
        # Each replicated kind is there: on TP copies x DP replicas (4 ranks), or, for tiny-sc2's
        # KV heads, on 2 TP ranks (TP 4) or 2 DP replicas (TP 2).
        held = {name: len(c) for (name, _), c in holders.items()}
        mqa = runs["preset"] == "tiny-sc1"
        expected = {"final_norm.weight": 4, "blocks.0.attn_norm.bias": 4,
                    "blocks.0.attn.out_proj.bias": 4, "blocks.1.mlp.fc_out.bias": 4,
                    "blocks.1.attn.kv_proj.weight": 4 if mqa else 2,
                    **({"embedding.position.weight": 4} if mqa else {})}
        assert {name: held[name] for name in expected} == expected


def test_the_checkpoint_reads_back_exactly_at_any_layout(runs):
    """What `convert to-hf` and `load_model` read from a TP 2 or TP 4 checkpoint (shared KV heads
    included) is exactly the ranks' trained parameters."""
    vocab = load_config(runs["preset"]).model.vocab_size
    for tp, sp in LAYOUTS:
        folder, per_rank = runs[tp, sp]
        trained = assemble(per_rank)
        cfg, tensors = iter_checkpoint_weights(latest_checkpoint(folder))
        tensors = dict(tensors)
        assert tensors.keys() == trained.keys()
        for name, tensor in tensors.items():
            expected = trained[name][:vocab] if name in ("embedding.word.weight", "head.weight") else trained[name]
            assert torch.equal(tensor, expected), f"tp {tp} sp {sp}: {name}"


def test_a_tp2_checkpoint_exports_to_hugging_face(runs, tmp_path):
    folder, _ = runs[2, True]
    hf_dir = tmp_path / "hf"
    assert starcoder_main(["convert", "to-hf", "--checkpoint", str(folder), "--output", str(hf_dir)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == {"tiny-sc1": "GPTBigCodeForCausalLM",
                                 "tiny-sc2": "Starcoder2ForCausalLM"}[runs["preset"]]
    ours = starcoder.load_model(folder)
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.std() > 0.1
        assert (ours(ids) - ref).abs().max() <= 1e-4


def test_a_tp2_checkpoint_resumes_at_tp1_and_tp4_with_the_same_losses(runs, world, corpus):
    preset, root = runs["preset"], runs["root"]
    source, _ = runs[2, True]
    one = resume_from(source, 5, root / "tp2-to-tp1")
    train(config(preset, corpus, one))
    four = resume_from(source, 5, root / "tp2-to-tp4")
    world.run(_train, preset, corpus, str(four), layout_sets(4, True))
    for folder in (one, four):
        assert losses(folder)[:5] == losses(source)[:5]  # kept from before the checkpoint
        assert close(losses(folder)[5:], losses(source)[5:], abs_tol=LOSS_TOL), folder.name
        assert close(grad_norms(folder)[5:], grad_norms(source)[5:], rel_tol=NORM_TOL), folder.name


def test_resuming_where_the_padded_vocabulary_differs(world, corpus, tmp_path):
    """Vocabulary 8200 pads to 8320 rows at TP 1, 8448 at TP 2 and 8704 at TP 4 (Megatron pads to
    128 x tp). Only the real rows carry over, weights and Adam state alike, so the losses are
    those of the uninterrupted single-process run: TP 4 -> TP 1 (fewer rows) and TP 1 -> TP 2 x
    DP 2 with the distributed optimizer (more rows; Adam state on one data-parallel rank)."""
    sets = ["model.vocab_size=8200", "model.tie_word_embeddings=false", "train.max_steps=4",
            "train.save_every=2"]
    ref = tmp_path / "reference"
    train(config("tiny-sc2", corpus, ref, *sets))
    tp4 = tmp_path / "tp4"
    world.run(_train, "tiny-sc2", corpus, str(tp4), [*sets, *layout_sets(4, True)])
    assert close(losses(tp4), losses(ref), abs_tol=LOSS_TOL)

    shrink = resume_from(tp4, 2, tmp_path / "tp4-to-tp1")
    train(config("tiny-sc2", corpus, shrink, *sets))
    grow = resume_from(ref, 2, tmp_path / "tp1-to-tp2")
    world.run(_train, "tiny-sc2", corpus, str(grow),
              [*sets, *layout_sets(2, False), "parallel.distributed_optimizer=true"])
    for folder in (shrink, grow):
        assert close(losses(folder), losses(ref), abs_tol=LOSS_TOL), folder.name
        assert close(grad_norms(folder), grad_norms(ref), rel_tol=NORM_TOL), folder.name
