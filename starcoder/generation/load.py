"""A model and its tokenizer for generation, from a native model folder, a training run folder
(its latest checkpoint), a checkpoint step folder or a Hugging Face folder; optionally split for
tensor parallelism over an initialised process group."""

from __future__ import annotations

from pathlib import Path

import torch

from starcoder.config import ParallelConfig, UserError
from starcoder.convert.weights import load_weights, open_weights
from starcoder.data.tokenizer import load_tokenizer
from starcoder.generation.generate import Generator
from starcoder.models.gpt import GPT
from starcoder.parallel import init_grid, materialize, parallelize


def load_generator(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, tensor_parallel: int = 1) -> Generator:
    """A `Generator` over the model at `path` (eval mode, fp32 unless `dtype`); with `tensor_parallel` > 1 every rank
    of the default process group calls this and holds its shard."""
    device = torch.device(device)
    try:  # a step folder is verified here, once per job (shared by the ranks), not again below
        folder, _, cfg = open_weights(path, all_ranks=True)
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as err:  # missing folder or tokenizer, unreadable config
        raise UserError(f"--model: {err}") from None
    grid = init_grid(ParallelConfig(tensor_parallel=tensor_parallel), device.type)
    with torch.device("meta"):
        model = GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(grid.tp))
        parallelize(model, grid)
    materialize(model, device)  # fp32: stored weights of any dtype are cast on copy
    load_weights(model, folder, grid, verify=False)  # each rank reads only its own slices
    if dtype is not None:
        model.to(dtype)
    model.set_kernels(cfg.model.kernels, device)
    return Generator(model.eval(), tokenizer)
