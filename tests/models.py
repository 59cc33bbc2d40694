"""Tiny model folders for tests that need a real model on disk (see the `tiny_models` fixture)."""

from __future__ import annotations

from pathlib import Path

import torch

from starcoder.config import load_config
from starcoder.convert.export import to_hf
from starcoder.convert.native import write_model_folder
from starcoder.data.tokenizer import load_tokenizer
from starcoder.models.gpt import GPT
from starcoder.models.init import init_weights


def write_tiny_model(folder: Path, preset: str, overrides: list[str] = (), seed: int = 0,
                     std: float = 0.2) -> dict[str, Path]:
    cfg = load_config(preset, [f"model.init_method_std={std}", *overrides])
    model = GPT(cfg.model)
    init_weights(model, cfg.model, seed)
    vocab = cfg.model.vocab_size
    tensors = ((name, t[:vocab] if name == "embedding.word.weight" else t)
               for name, t in model.state_dict().items())
    native = Path(folder) / "native"
    write_model_folder(native, cfg, tensors)
    load_tokenizer(cfg.data.tokenizer).save(native)
    return {"native": native, "hf": to_hf(native, Path(folder) / "hf"), "config": cfg}
