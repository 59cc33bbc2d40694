"""Reading weights from any kind of folder.

Folders understood: a native model folder (`config.yaml` + safetensors), a Hugging Face model
folder (`config.json` + safetensors, GPTBigCode or Starcoder2), a training run folder (its
`checkpoints/latest`) and a checkpoint step folder. Weights stream one tensor at a time under
native names, unsharded and unpadded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch

from starcoder.config import Config, TrainConfig
from starcoder.convert.checkpoints import is_step_folder, iter_checkpoint_weights, resolve_checkpoint
from starcoder.convert.hf import hf_to_native, model_config_from_hf
from starcoder.convert.native import is_model_folder, iter_model_folder
from starcoder.convert.sharded import iter_safetensors


def is_hf_folder(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def resolve_folder(path: str | Path) -> Path:
    """The folder that holds the weights and tokenizer: a training run folder means its latest
    step folder; any other folder means itself."""
    return resolve_checkpoint(path) or Path(path)


def iter_weights(path: str | Path) -> tuple[Config, Iterator[tuple[str, torch.Tensor]]]:
    """(config, iterator of (native name, full tensor)) for a native or Hugging Face model folder,
    a training run folder or a checkpoint step folder."""
    path = resolve_folder(path)
    if is_step_folder(path):  # before is_model_folder: a step folder has a config.yaml too
        return iter_checkpoint_weights(path)
    if is_model_folder(path):
        return iter_model_folder(path)
    if is_hf_folder(path):
        cfg = config_from_hf_folder(path)
        return cfg, hf_to_native(cfg.model, iter_safetensors(path))
    raise FileNotFoundError(f"{path}: not a model folder (no config.yaml), a Hugging Face model "
                            f"(no config.json), a training run (no checkpoints/latest) nor a "
                            f"checkpoint step folder (no trainer_state.json)")


def config_from_hf_folder(path: Path) -> Config:
    model = model_config_from_hf(json.loads((Path(path) / "config.json").read_text()))
    return Config(model=model, train=TrainConfig(seq_length=model.max_position_embeddings)).validate()


@torch.no_grad()
def load_weights_into(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy full tensors into the model's (possibly padded, possibly sharded) parameters.

    Missing rows of a padded vocabulary are zero. A sharded parameter (`full_shape` and
    `shard_slices` attributes) keeps its slice of the full tensor.
    """
    params = dict(model.named_parameters())
    seen = set()
    for name, tensor in tensors:
        if name not in params:
            raise KeyError(f"weights have {name!r}, which the model does not")
        param = params[name]
        shape = tuple(getattr(param, "full_shape", param.shape))
        full = tensor
        if tuple(tensor.shape) != shape:
            if tensor.shape[1:] != shape[1:] or tensor.shape[0] > shape[0]:
                raise ValueError(f"{name}: weights have shape {tuple(tensor.shape)}, model {shape}")
            full = tensor.new_zeros(shape)  # vocabulary padding
            full[: tensor.shape[0]] = tensor
        param.copy_(full[getattr(param, "shard_slices", ())])
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise KeyError(f"weights lack {len(missing)} tensors the model needs, e.g. {missing[:3]}")


