"""Whole-folder conversions behind `starcoder convert to-hf` and `from-hf` (streaming).

The source is checked against its config before anything is written (`open_weights`), and the
output is written into a temporary sibling folder that replaces `output` only once complete
(`replacing_folder`): a failed conversion leaves nothing behind and an earlier good output intact,
and a re-export leaves no file of the previous one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from starcoder.config import Config, UserError
from starcoder.convert.checkpoints import verify_step_folder
from starcoder.convert.hf import hf_config, native_to_hf
from starcoder.convert.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_adapter
from starcoder.convert.native import copy_tokenizer_files, write_model_folder
from starcoder.convert.sharded import DEFAULT_SHARD_SIZE, ShardedWriter, parse_size, replacing_folder
from starcoder.convert.weights import (folder_kind, is_hf_folder, iter_weights, native_shapes,
                                       read_folder_config, read_lora, resolve_folder)


def to_hf(source: str | Path, output: str | Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
          dtype: torch.dtype | None = None, progress: bool | None = None) -> Path:
    """Any readable folder -> a Hugging Face model folder (config.json, safetensors, tokenizer);
    a LoRA run's checkpoint gives its merged weights. `progress`: a tqdm bar over the tensors
    (None: when stderr is a terminal)."""
    parse_size(max_shard_size)
    source, output = resolve_folder(source), Path(output)
    seen_dtype = None
    with replacing_folder(output) as tmp:
        cfg, tensors = iter_weights(source)
        with ShardedWriter(tmp, max_shard_size) as writer:
            for name, tensor in native_to_hf(cfg.model, _progress(tensors, cfg, "to-hf", progress)):
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                seen_dtype = seen_dtype or tensor.dtype
                writer.add(name, tensor)
        config = hf_config(cfg.model, seen_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_extras(source, tmp, cfg.model.bos_token_id, cfg.model.eos_token_id)
    return output


def adapter_to_peft(source: str | Path, output: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A LoRA run's checkpoint -> a PEFT adapter folder (adapter_config.json,
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the Hugging Face
    export of the base model (`to_hf` of `train.init_from`)."""
    source, output = resolve_folder(source), Path(output)
    if folder_kind(source) != "step":
        raise UserError(f"{source}: --adapter-only exports a LoRA run's checkpoint (a run or step "
                        f"folder); this is a model folder without adapters")
    verify_step_folder(source)
    cfg = read_folder_config(source, "step")
    if not cfg.finetune.lora_rank:
        raise UserError(f"{source}: not a LoRA checkpoint (finetune.lora_rank is 0 in its config)")
    config, tensors = peft_adapter(cfg, read_lora(source), cfg.train.init_from)
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    with replacing_folder(output) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return output


def from_hf(source: str | Path, output: str | Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
            progress: bool | None = None) -> Path:
    """A Hugging Face GPTBigCode/Starcoder2 folder -> a native model folder (dtype kept)."""
    parse_size(max_shard_size)
    source, output = resolve_folder(source), Path(output)
    if not is_hf_folder(source):
        raise UserError(f"{source}: not a Hugging Face model folder (no config.json)")
    with replacing_folder(output) as tmp:
        cfg, tensors = iter_weights(source)
        write_model_folder(tmp, cfg, _progress(tensors, cfg, "from-hf", progress), max_shard_size)
        _copy_extras(source, tmp)
    return output


def _progress(tensors, cfg: Config, desc: str, progress: bool | None):
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(tensors, total=len(native_shapes(cfg)), unit="tensor", desc=desc, disable=not show)


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


