"""Whole-folder conversions behind `starcoder convert to-hf` and `from-hf` (streaming)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from starcoder.convert.weights import config_from_hf_folder, iter_weights, resolve_folder
from starcoder.convert.hf import hf_config, hf_to_native, native_to_hf
from starcoder.convert.native import copy_tokenizer_files, write_model_folder
from starcoder.convert.sharded import DEFAULT_SHARD_SIZE, ShardedWriter, iter_safetensors


def to_hf(source: str | Path, output: str | Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
          dtype: torch.dtype | None = None) -> Path:
    """Any readable folder -> a Hugging Face model folder (config.json, safetensors, tokenizer)."""
    source, output = resolve_folder(source), Path(output)
    cfg, tensors = iter_weights(source)
    seen_dtype = None
    with ShardedWriter(output, max_shard_size) as writer:
        for name, tensor in native_to_hf(cfg.model, tensors):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            seen_dtype = seen_dtype or tensor.dtype
            writer.add(name, tensor)
    config = hf_config(cfg.model, seen_dtype)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_extras(source, output, cfg.model.bos_token_id, cfg.model.eos_token_id)
    return output


def from_hf(source: str | Path, output: str | Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """A Hugging Face GPTBigCode/Starcoder2 folder -> a native model folder (dtype kept)."""
    source, output = Path(source), Path(output)
    cfg = config_from_hf_folder(source)
    write_model_folder(output, cfg, hf_to_native(cfg.model, iter_safetensors(source)), max_shard_size)
    _copy_extras(source, output)
    return output


def _copy_extras(source: Path, output: Path, bos: int | None = None, eos: int | None = None) -> None:
    """Tokenizer files and generation_config.json travel with the weights; to-hf writes a
    generation config from the model's bos/eos when the source has none."""
    copy_tokenizer_files(source, output)
    generation = source / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, output / "generation_config.json")
    elif bos is not None:
        (output / "generation_config.json").write_text(
            json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2) + "\n")


