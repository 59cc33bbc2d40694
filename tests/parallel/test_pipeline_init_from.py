"""`train.init_from` under pipeline parallelism (2 ranks): each stage loads only its own tensors,
from a native model folder, a Hugging Face export (tied embeddings, two stages per rank) and a
LoRA run's step folder (merged, at another vocabulary padding, ZB-V), also with LoRA adapters
training on the stages, and the run logs the losses of the same start at PP 1. A source that does
not fit the whole model, or a corrupt step folder, is the same one line on every rank, and the
ranks checksum a step folder's files once between them. One 2-rank gloo world."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from starcoder.config import ConfigError
from starcoder.convert import checkpoints
from starcoder.convert.checkpoints import DCP_DIR, latest_checkpoint, read_manifest
from starcoder.convert.export import to_hf
from starcoder.convert.native import write_model_folder
from starcoder.convert.weights import VOCAB_PADDED
from starcoder.models.gpt import GPT
from starcoder.models.init import init_weights
from starcoder.training.trainer import train
from tests.distributed import World
from tests.parallel.pipeline_helpers import PP_TOL, config, layout, matches
from tests.training.helpers import make_corpus, run_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = ["train.max_steps=3", "train.eval_every=0", "train.save_every=0"]
NO_DROPOUT_LORA = ["finetune.lora_rank=4", "finetune.lora_dropout=0"]  # stages draw their own masks
# name: (preset, source, settings of both runs, parallel settings, bit-identical to one process)
CASES = {
    "native-1f1b": ("tiny-sc2", "native", [], layout(1, 2), True),
    "hf-tied-interleaved-v2": ("tiny-sc1", "hf", [], layout(1, 2, "parallel.virtual_pipeline=2"), False),
    # ZB-V: rank 0 holds stages 0 and 3 (both vocabulary tensors), rank 1 neither
    "lora-step-zbv": ("tiny-sc2", "step", ["model.vocab_size=8200"],
                      layout(1, 2, "parallel.pipeline_schedule=zero_bubble", "parallel.virtual_pipeline=2"),
                      False),
    "lora-adapters-hf-tied-interleaved-v2": ("tiny-sc1", "hf", NO_DROPOUT_LORA,
                                             layout(1, 2, "parallel.virtual_pipeline=2"), False),
}


def model_folder(preset: str, corpus: str, folder: Path, *overrides: str) -> Path:
    """A native model folder of the preset's test model from seed 5 (the runs draw from seed 1,
    so a run that ignored its source would log other losses)."""
    cfg = config(preset, corpus, folder, *overrides)
    model = GPT(cfg.model)
    init_weights(model, cfg.model, seed=5)
    vocab = cfg.model.vocab_size
    write_model_folder(folder, cfg, ((n, p.detach()[:vocab] if n in VOCAB_PADDED else p.detach())
                                     for n, p in model.named_parameters()))
    return folder


def train_counting_checksums(preset: str, corpus: str, out: str, sets: list[str],
                             source: str) -> list[str]:
    """Train on this rank; returns the files of `source` it checksummed."""
    real, read = checkpoints.file_checksum, []

    def counting(path, *args, **kwargs):
        if Path(source) in Path(path).parents:
            read.append(str(Path(path).relative_to(source)))
        return real(path, *args, **kwargs)

    checkpoints.file_checksum = counting
    try:
        run_trainer(config(preset, corpus, out, *sets))
    finally:
        checkpoints.file_checksum = real
    return read


def start_error(preset: str, corpus: str, out: str, sets: list[str]) -> str | None:
    try:
        run_trainer(config(preset, corpus, out, *sets))
    except ConfigError as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("pp-init-from")


@pytest.fixture(scope="module")
def sources(root):
    corpus = make_corpus(root / "corpus")
    native = {p: model_folder(p, corpus, root / f"native-{p}") for p in ("tiny-sc1", "tiny-sc2")}
    # 8200 rows padded to 8256 there, to 8320 in the runs from it: re-padded on load
    vocab = ["model.vocab_size=8200", "model.make_vocab_size_divisible_by=64"]
    lora_run = root / "lora-run"
    train(config("tiny-sc2", corpus, lora_run, *vocab, "finetune.lora_rank=4", "train.max_steps=1",
                 f"train.init_from={model_folder('tiny-sc2', corpus, root / 'native-8200', *vocab)}",
                 "train.eval_every=0", "train.save_every=1"))
    corrupt = root / "corrupt-run"
    corrupt_step = corrupt / "checkpoints" / latest_checkpoint(lora_run).name
    shutil.copytree(lora_run / "checkpoints", corrupt / "checkpoints")
    shard = sorted((corrupt_step / DCP_DIR).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, another checksum
    shard.write_bytes(bytes(data))
    return {"corpus": corpus, "native": native["tiny-sc2"], "lora-run": lora_run, "corrupt": corrupt,
            "hf": to_hf(native["tiny-sc1"], root / "hf-tiny-sc1"),
            "native-5-layers": model_folder("tiny-sc2", corpus, root / "native-5", "model.num_layers=5"),
            "native-3-layers": model_folder("tiny-sc2", corpus, root / "native-3", "model.num_layers=3")}


def source_of(sources, kind: str) -> Path:
    return {"native": sources["native"], "hf": sources["hf"], "step": sources["lora-run"]}[kind]


@pytest.fixture(scope="module")
def runs(root, sources):
    """Each case at PP 1 (in this process) and at its layout (in the world); the files each rank
    checksummed; the start-up errors of the sources that do not fit."""
    corpus, out = sources["corpus"], {}
    for name, (preset, kind, sets, _, _) in CASES.items():
        init = f"train.init_from={source_of(sources, kind)}"
        train(config(preset, corpus, root / f"{name}-pp1", init, *SHORT, *sets))
    errors = {}
    with World(2, timeout=90) as world:
        for name, (preset, kind, sets, parallel, _) in CASES.items():
            source = source_of(sources, kind)
            out[name] = world.run(train_counting_checksums, preset, corpus, str(root / name),
                                  [f"train.init_from={source}", *SHORT, *sets, *parallel],
                                  str(source.resolve()))
        for bad in ("native-5-layers", "native-3-layers", "corrupt"):
            errors[bad] = world.run(start_error, "tiny-sc2", corpus, str(root / f"error-{bad}"),
                                    [f"train.init_from={sources[bad]}", *SHORT, *layout(1, 2)])
    return out, errors


@pytest.mark.parametrize("name", sorted(CASES))
def test_init_from_at_pp2_gives_the_pp1_losses(root, runs, name):
    exact = CASES[name][4]
    assert matches(root / name, root / f"{name}-pp1", 0.0 if exact else PP_TOL, validation=False)


def test_each_step_folder_file_is_checksummed_once_per_job(runs, sources):
    read = runs[0]["lora-step-zbv"]
    step = latest_checkpoint(sources["lora-run"])
    files = sorted(f"{step.relative_to(sources['lora-run'])}/{n}" for n in read_manifest(step)["files"])
    assert all(read), read  # both ranks take a share
    assert sorted(read[0] + read[1]) == files


@pytest.mark.parametrize("bad, words", [
    ("native-5-layers", r"tensor blocks\.4\.\S+ is not part of the model \(model\.num_layers: 5 there"),
    ("native-3-layers", r"has no tensor blocks\.3\.\S+, which the model needs"),  # rank 0 needs none of it
    ("corrupt", r"corrupt checkpoint: dcp/\S+ does not match its checksum"),
])
def test_a_wrong_source_is_the_same_line_on_every_rank(runs, sources, bad, words):
    errors = runs[1][bad]
    assert errors[0] == errors[1] and "\n" not in errors[0], errors
    assert errors[0].startswith("train.init_from: ") and re.search(words, errors[0]), errors[0]
