"""Native model folders: `config.yaml` (the resolved run config) + safetensors weights + tokenizer.

Weights are stored unsharded and unpadded (the real vocabulary rows only), under the model's own
parameter names; padding is a runtime layout detail added back when a model is loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch

from starcoder.config import Config, config_from_dict, parse_yaml
from starcoder.convert.sharded import DEFAULT_SHARD_SIZE, ShardedWriter, iter_safetensors

CONFIG_NAME = "config.yaml"
# Tokenizer files a model folder carries along (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")


def is_model_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(folder: Path) -> Config:
    return config_from_dict(parse_yaml((Path(folder) / CONFIG_NAME).read_text())).validate()


def iter_model_folder(folder: Path) -> tuple[Config, Iterator[tuple[str, torch.Tensor]]]:
    return read_config(folder), iter_safetensors(folder)


def write_model_folder(folder: Path, cfg: Config, tensors: Iterable[tuple[str, torch.Tensor]],
                       max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                       tokenizer_from: Path | None = None) -> Path:
    """`tensors`: full, unpadded tensors under native names (what `weights.iter_weights` yields)."""
    folder = Path(folder)
    with ShardedWriter(folder, max_shard_size) as writer:
        for name, tensor in tensors:
            writer.add(name, tensor)
    (folder / CONFIG_NAME).write_text(cfg.to_yaml())
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, folder)
    return folder


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
