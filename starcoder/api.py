"""The package's public face: `load_model`. Weight reading lives in `starcoder.convert.weights`."""

from __future__ import annotations

from pathlib import Path

import torch

from starcoder.convert.weights import iter_weights, load_weights_into
from starcoder.models.gpt import GPT


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> GPT:
    """The model in eval mode; dtype defaults to that of the stored weights."""
    cfg, tensors = iter_weights(path)
    first = next(tensors)
    with torch.device("meta"):
        model = GPT(cfg.model)
    model.to_empty(device=device)
    model.to(dtype or first[1].dtype)
    load_weights_into(model, _chain(first, tensors))
    model.set_kernels(cfg.model.kernels, torch.device(device))
    return model.eval()


def _chain(first, rest):
    yield first
    yield from rest
