"""Sharded safetensors, read and written one tensor at a time.

Real checkpoints are tens of GB, so nothing here holds a whole model: reading opens one shard
file at a time (its memory map is closed before the next), writing buffers at most one output
shard. The layout is Hugging Face's: `model.safetensors`, or `model-00001-of-00004.safetensors`
... plus `model.safetensors.index.json` mapping each tensor to its file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from starcoder.config import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 1024**3


def parse_size(size: int | str) -> int:
    """`5GB`, `64MiB`, `1000000` -> bytes (HF's `max_shard_size` spellings)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not match:
        raise UserError(f"--max-shard-size: not a size: {size!r} (expected e.g. 5GB, 64MiB or a byte count)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def weight_map(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> file from the index, or None for an unsharded folder."""
    index = Path(folder) / INDEX_NAME
    if not index.is_file():
        return None
    try:
        names = json.loads(index.read_text())["weight_map"]
        return {name: index.parent / file for name, file in names.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in index order (or the single file)."""
    folder = Path(folder)
    index = weight_map(folder)
    if index is not None:
        files = list(dict.fromkeys(index.values()))
        for path in files:
            if not path.is_file():
                raise UserError(f"{path}: missing (the shard {folder / INDEX_NAME} names)")
        return files
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})")
    return files


@contextlib.contextmanager
def open_safetensors(path: Path):
    """`safe_open`, with a damaged file reported as a user error naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def read_headers(folder: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, safetensors dtype such as F32) from the headers alone; every tensor
    the index lists must be in the file it names."""
    found = {}
    for path in safetensors_files(folder):
        with open_safetensors(path) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                found[name] = (path, tuple(piece.get_shape()), piece.get_dtype())
    for name, path in (weight_map(folder) or {}).items():
        if found.get(name, (None,))[0] != path:
            raise UserError(f"{path}: lacks tensor {name}, which {INDEX_NAME} places there")
    return found


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a (sharded) safetensors folder, one at a time."""
    for path in safetensors_files(folder):
        with open_safetensors(path) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@contextlib.contextmanager
def replacing_folder(output: Path):
    """A fresh temporary sibling of `output` to write into. On success it replaces `output`
    whole, so nothing of an earlier export (a stale index, extra shards) survives; on failure
    it is removed and `output` is left as it was. An existing `output` must be a folder that
    holds a model (or nothing): any other folder or file is refused, not replaced."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not _holds_model(output):
        raise UserError(f"{output}: a folder that holds no model (no config.json, config.yaml or "
                        f"safetensors); refusing to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _holds_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("config.json", "config.yaml", INDEX_NAME)) \
        or any(folder.glob("*.safetensors"))


def _remove_orphans(output: Path) -> None:
    """Clean up after conversions into `output` that were killed (their process is gone): a
    half-written folder goes; a previous output set aside just before the final rename comes
    back if nothing replaced it."""
    for path in output.parent.glob(f".{glob.escape(output.name)}.*-*"):
        kind, _, pid = path.name.rpartition("-")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if kind.endswith(".old") and not output.exists():
            os.replace(path, output)
        elif kind.endswith((".tmp", ".old")):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def _umask_mode(mode: int = 0o666) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


class ShardedWriter:
    """Write tensors into shards of at most `max_shard_size` bytes (a larger tensor gets its own)."""

    def __init__(self, folder: Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, str(path), metadata=self.metadata)
        os.chmod(path, _umask_mode())  # safetensors creates its files 0600 whatever the umask
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards (now that their number is known) and write the index."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], self.folder / SINGLE_NAME)
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
