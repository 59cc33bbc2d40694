"""Sharded safetensors, read and written one tensor at a time.

Real checkpoints are tens of GB, so nothing here holds a whole model: reading opens one shard
file at a time (its memory map is closed before the next), writing buffers at most one output
shard. The layout is Hugging Face's: `model.safetensors`, or `model-00001-of-00004.safetensors`
... plus `model.safetensors.index.json` mapping each tensor to its file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 1024**3


def parse_size(size: int | str) -> int:
    """`5GB`, `64MiB`, `1000000` -> bytes (HF's `max_shard_size` spellings)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {size!r} (expected e.g. 5GB, 64MiB or a byte count)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in index order (or the single file)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})")
    return files


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a (sharded) safetensors folder, one at a time."""
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


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
