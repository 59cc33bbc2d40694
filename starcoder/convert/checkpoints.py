"""Reading training checkpoints (step folders) without a process group.

The layout the trainer writes (`starcoder.training.checkpoint` saves and loads in place):

    <output_dir>/checkpoints/latest                 the name of the newest complete step folder
    <output_dir>/checkpoints/step_0000100/
        config.yaml                                 the resolved run config
        trainer_state.json                          step, consumed samples, loss scale, ... (JSON)
        tokenizer.json, ...                         the tokenizer files
        dcp/shard-00001-model-00001-of-00001.safetensors   one file per rank

It lives here, below the trainer, so that conversion and `load_model` read checkpoints without
importing the training loop.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader

from starcoder.config import Config, load_config

LATEST = "latest"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
DCP_DIR = "dcp"
STEP_RE = re.compile(r"^step_(\d+)$")
# Rows of these tensors are padded to the padded vocabulary inside a run; exports drop them.
VOCAB_PADDED = ("embedding.word.weight", "head.weight")


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_step_folder(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file() and (Path(path) / DCP_DIR).is_dir()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step folder `latest` names in a run folder, or None when the run has none yet."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not is_step_folder(folder):
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is not a complete checkpoint")
    return folder


def resolve_checkpoint(path: str | Path) -> Path | None:
    """The step folder meant by a step folder, a run folder or its `checkpoints` folder (these
    follow `latest`); None for anything else, e.g. a model folder."""
    path = Path(path)
    if is_step_folder(path):
        return path
    if (checkpoints_dir(path) / LATEST).is_file():
        return latest_checkpoint(path)
    if path.name == "checkpoints" and (path / LATEST).is_file():
        return latest_checkpoint(path.parent)
    return None


def read_state(step_dir: Path) -> dict:
    return json.loads((Path(step_dir) / STATE_FILE).read_text())


def read_config(step_dir: Path) -> Config:
    return load_config(Path(step_dir) / CONFIG_FILE)


def iter_checkpoint_weights(step_dir: str | Path) -> tuple[Config, Iterator[tuple[str, torch.Tensor]]]:
    """(config, iterator of (parameter name, full unpadded fp32 tensor)) from a step folder, one
    tensor in memory at a time, without a process group."""
    step_dir = Path(step_dir)
    cfg = read_config(step_dir)
    reader = CheckpointReader(step_dir / DCP_DIR)
    metadata = reader.read_metadata().state_dict_metadata
    names = [key[len("model."):] for key in metadata if key.startswith("model.")]

    def tensors():
        for name in names:
            meta = metadata[f"model.{name}"]
            tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
            dcp_load({f"model.{name}": tensor}, reader, step_dir, single_process=True)
            yield name, tensor[: cfg.model.vocab_size] if name in VOCAB_PADDED else tensor

    return cfg, tensors()


class CheckpointReader(HuggingFaceStorageReader):
    """Reads every shard's safetensors header once, however many loads follow."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


def dcp_load(tensors: dict, reader: CheckpointReader, step_dir: Path,
             single_process: bool = False) -> None:
    try:
        with quiet_single_process():
            dcp.load(tensors, storage_reader=reader, no_dist=single_process)
    except dcp.api.CheckpointException as err:  # a BaseException: re-raise as an ordinary error
        raise RuntimeError(f"{step_dir}: cannot load the checkpoint: {err}") from None


class quiet_single_process(warnings.catch_warnings):
    """DCP warns that it assumes a single process when there is no process group; that is meant."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return self
