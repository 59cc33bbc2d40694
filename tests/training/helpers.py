"""Shared pieces of the training tests: a small real corpus and a tiny config.

The model is tiny-sc2 cut down to 2 layers x 64 (window 16, sequence 32) so a step costs a few
milliseconds; the corpus is a few standard-library files tokenised with the built-in tokenizer
through the real data path.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

from starcoder.cli.demo import stdlib_sources
from starcoder.config import Config, load_config

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.sliding_window=16",
        "train.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.max_steps=4", "train.warmup_steps=2", "train.lr_decay_steps=20", "train.lr=3e-3",
        "log.every=1", "log.tensorboard=false", "log.progress_bar=false", "data.num_workers=0"]


def make_corpus(folder: Path, files: int = 12) -> str:
    from starcoder.data import preprocess_corpus

    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "docs.jsonl"
    with open(jsonl, "w") as f:
        for path in stdlib_sources(files):
            f.write(json.dumps({"content": path.read_text(errors="replace")}) + "\n")
    prefix = str(folder / "corpus")
    preprocess_corpus([jsonl], "builtin:tiny", prefix, progress=False)
    return prefix


def make_sft_corpus(folder: Path, pairs: int = 24) -> str:
    """Prefix of a small instruct dataset (short prompts, responses of 8 to 31 characters of
    standard-library code, so every example fits a 33-token row), with its loss mask."""
    from starcoder.data import preprocess_corpus

    folder.mkdir(parents=True, exist_ok=True)
    code = "\n".join(p.read_text(errors="replace") for p in stdlib_sources(2))
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(pairs):
            f.write(json.dumps({"instruction": f"Go on {i}", "response": code[i * 97:i * 97 + 8 + i]}) + "\n")
    prefix = str(folder / "sft")
    preprocess_corpus([folder / "pairs.jsonl"], "builtin:tiny", prefix, fmt="instruct",
                      template="Q: {instruction}\nA: {response}", progress=False)
    return prefix


def make_preference_corpus(folder: Path, pairs: int = 16) -> str:
    """Prefix of a small preference dataset (`--format preference`): a short prompt, a chosen
    and a rejected response of standard-library code (6 to 21 characters), so both fit a 33-token
    row."""
    from starcoder.data import preprocess_corpus

    folder.mkdir(parents=True, exist_ok=True)
    code = "\n".join(p.read_text(errors="replace") for p in stdlib_sources(2))
    with open(folder / "prefs.jsonl", "w") as f:
        for i in range(pairs):
            f.write(json.dumps({"prompt": f"Go on {i}", "chosen": code[i * 89:i * 89 + 6 + i],
                                "rejected": code[i * 53 + 7:i * 53 + 13 + i // 2]}) + "\n")
    prefix = str(folder / "prefs")
    preprocess_corpus([folder / "prefs.jsonl"], "builtin:tiny", prefix, fmt="preference",
                      template="Q: {instruction}\nA: {response}", progress=False)
    return prefix


def tiny_config(corpus: str, out: Path, *overrides: str) -> Config:
    return load_config("tiny-sc2", [*TINY, f"data.paths=[{corpus}]", f"train.output_dir={out}",
                                    *overrides])


def tiny_args(corpus: str, out: Path, *overrides: str) -> list[str]:
    """The same config as `starcoder train` arguments."""
    args = ["--config", "tiny-sc2"]
    for item in [*TINY, f"data.paths=[{corpus}]", f"train.output_dir={out}", *overrides]:
        args += ["--set", item]
    return args


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


def close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=0, abs_tol=tol) for x, y in zip(a, b))


def run_trainer(cfg: Config):
    """A `Trainer` built from `cfg`, run to `train.max_steps` and closed (the model stays usable)."""
    from starcoder.training.signals import StopRequest
    from starcoder.training.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        with StopRequest() as stop:
            trainer.run(stop)
    finally:
        trainer.close()
    return trainer


@contextmanager
def checksummed_files(folder: Path):
    """Yields a list that collects, for each `file_checksum` call inside the block on a file under
    `folder`, that file's path relative to `folder`."""
    from starcoder.convert import checkpoints

    real, read = checkpoints.file_checksum, []

    def counting(path, *args, **kwargs):
        if Path(folder) in Path(path).parents:
            read.append(str(Path(path).relative_to(folder)))
        return real(path, *args, **kwargs)

    checkpoints.file_checksum = counting
    try:
        yield read
    finally:
        checkpoints.file_checksum = real


def corrupt_copy(step_dir: Path, dest: Path) -> Path:
    """A copy of a step folder with one byte of a shard flipped (same size, another checksum)."""
    from starcoder.convert.checkpoints import DCP_DIR

    shutil.copytree(step_dir, dest)
    shard = sorted((dest / DCP_DIR).glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    return dest
