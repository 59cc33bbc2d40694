"""Reading training checkpoints (step folders) without a process group.

The layout the trainer writes (`starcoder.training.checkpoint` saves and loads in place):

    <output_dir>/checkpoints/latest                 the name of the newest complete step folder
    <output_dir>/checkpoints/step_0000100/
        config.yaml                                 the resolved run config
        trainer_state.json                          step, consumed samples, loss scale, ... (JSON)
        tokenizer.json, ...                         the tokenizer files
        dcp/shard-00001-model-00001-of-00001.safetensors   one file per rank
        manifest.json                               every file's size and xxh3 checksum, every
                                                    tensor's global shape and dtype (written last)

A step folder that fails verification is renamed `step_0000100.corrupt` by the trainer (set
aside, never deleted); readers here refuse it with one line that says why.

It lives here, below the trainer, so that conversion and `load_model` read checkpoints without
importing the training loop.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import HuggingFaceStorageReader

from starcoder.config import Config, UserError, load_config

LATEST = "latest"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
DCP_DIR = "dcp"
MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step_(\d+)$")
# Rows of these tensors are padded to the padded vocabulary inside a run; exports drop them.
VOCAB_PADDED = ("embedding.word.weight", "head.weight")


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_step_folder(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file() and (Path(path) / DCP_DIR).is_dir()


def step_folders(run_dir: str | Path) -> list[Path]:
    """The run's step folders (complete or not, never the set-aside ones), newest first."""
    root = checkpoints_dir(run_dir)
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name))] \
        if root.is_dir() else []
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step folder `latest` names in a run folder; without a `latest`, the newest step folder
    (e.g. one copied into a new run); None when the run has none."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        folders = step_folders(run_dir)
        return folders[0] if folders else None
    folder = pointer.parent / pointer.read_text().strip()
    if not is_step_folder(folder):
        raise CheckpointError(f"{pointer} names {folder.name}, which is not a complete checkpoint")
    return folder


def resolve_checkpoint(path: str | Path) -> Path | None:
    """The step folder meant by a step folder, a run folder or its `checkpoints` folder (these
    follow `latest`); None for anything else, e.g. a model folder."""
    path = Path(path)
    if is_step_folder(path):
        return path
    if path.name == "checkpoints" and not checkpoints_dir(path).is_dir():
        path = path.parent
    if checkpoints_dir(path).is_dir():
        return latest_checkpoint(path)
    return None


def read_state(step_dir: Path) -> dict:
    return json.loads((Path(step_dir) / STATE_FILE).read_text())


def read_config(step_dir: Path) -> Config:
    return load_config(Path(step_dir) / CONFIG_FILE)


def verify_step_folder(step_dir: str | Path) -> CheckpointReader:
    """A reader of a step folder whose files and tensors match its manifest (checksums included);
    a CheckpointError naming the folder otherwise."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    raise_problem(step_dir, check_files(step_dir, manifest, sorted(manifest["files"])))
    reader = CheckpointReader(step_dir / DCP_DIR)
    raise_problem(step_dir, check_tensors(manifest, reader.read_metadata()))
    return reader


def iter_checkpoint_weights(step_dir: str | Path, verify: bool = True
                            ) -> tuple[Config, Iterator[tuple[str, torch.Tensor]]]:
    """(config, iterator of (parameter name, full unpadded fp32 tensor)) from a step folder, one
    tensor in memory at a time, without a process group. `verify=False` when the caller has
    already run `verify_step_folder`."""
    step_dir = Path(step_dir)
    reader = verify_step_folder(step_dir) if verify else CheckpointReader(step_dir / DCP_DIR)
    cfg = read_config(step_dir)
    metadata = reader.read_metadata().state_dict_metadata
    names = [key[len("model."):] for key in metadata if key.startswith("model.")]

    def tensors():
        for name in names:
            meta = metadata[f"model.{name}"]
            tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
            dcp_load({f"model.{name}": tensor}, reader, step_dir, single_process=True)
            yield name, tensor[: cfg.model.vocab_size] if name in VOCAB_PADDED else tensor

    return cfg, tensors()


# --------------------------------------------------------------------------------------------
# Integrity: the manifest


class CheckpointError(UserError):
    """A step folder that is incomplete or corrupt; the message names it and says why."""


def file_checksum(path: Path, chunk: int = 16 << 20) -> str:
    """xxh3-64 of a file, read in chunks: about 20 GB/s a core against zlib CRC-32's 1.5-3 (and
    BLAKE2b's 0.5), so verifying costs little more than reading (benchmarks/RESULTS.md)."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _seal(body: dict) -> str:
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def write_manifest(step_dir: Path, files: dict[str, dict], tensors: dict[str, dict]) -> None:
    """`files`: path in the step folder -> {"size", "xxh3"}; `tensors`: key -> {"shape", "dtype"}.
    The manifest seals itself with a CRC-32 of its own body."""
    body = {"format": 1, "checksum": "xxh3_64", "files": files, "tensors": tensors}
    (Path(step_dir) / MANIFEST).write_text(json.dumps({**body, "seal": _seal(body)}, indent=1) + "\n")


def describe_file(path: Path) -> dict:
    return {"size": path.stat().st_size, "xxh3": file_checksum(path)}


def read_manifest(step_dir: Path) -> dict:
    path = Path(step_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
        seal = manifest.pop("seal")
        files, tensors = manifest["files"], manifest["tensors"]
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: no {MANIFEST} (an incomplete checkpoint)") from None
    except (ValueError, KeyError, TypeError, AttributeError):  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: corrupt (not the manifest the trainer writes)") from None
    if seal != _seal(manifest) or not (isinstance(files, dict) and isinstance(tensors, dict)):
        raise CheckpointError(f"{path}: corrupt (its seal does not match its contents)")
    return manifest


def check_files(step_dir: Path, manifest: dict, names: list[str], checksums: bool = True) -> str | None:
    """Why the files `names` of the manifest are not as written (missing, another size, another
    checksum), or None. Sizes are always checked; checksums read every byte."""
    for name in names:
        path, want = Path(step_dir) / name, manifest["files"][name]
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['size']}"
        if checksums and file_checksum(path) != want["xxh3"]:
            return f"{name} does not match its checksum (its bytes changed after it was written)"
    return None


def check_tensors(manifest: dict, metadata) -> str | None:
    """Why the tensors in the shard headers differ from those the manifest records, or None."""
    stored = metadata.state_dict_metadata
    for key, want in manifest["tensors"].items():
        meta = stored.get(key)
        if meta is None or not hasattr(meta, "size"):
            return f"tensor {key} is missing from the shards"
        if list(meta.size) != want["shape"] or str(meta.properties.dtype) != want["dtype"]:
            return (f"tensor {key} is {str(meta.properties.dtype)}{list(meta.size)} in the shards, "
                    f"{want['dtype']}{want['shape']} in the manifest")
    extra = sorted(set(stored) - set(manifest["tensors"]))
    return f"tensor {extra[0]} is in the shards but not in the manifest" if extra else None


def raise_problem(step_dir: Path, problem: str | None) -> None:
    if problem:
        raise CheckpointError(f"{step_dir}: corrupt checkpoint: {problem}")


class CheckpointReader(HuggingFaceStorageReader):
    """Reads every shard's safetensors header once, however many loads follow; `metadata`, when
    given (read by rank 0 and broadcast), means this reader opens no header at all."""

    def __init__(self, path: Path, metadata=None):
        super().__init__(str(path))
        self._metadata = metadata

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
