"""Micro-batches for one data-parallel rank, in Megatron's pretraining order.

Global step g consumes samples consumed+g*global .. +global-1; inside it each group of
micro_batch_size * dp_size consecutive samples is one micro-step and rank r takes the slice
[r*micro, (r+1)*micro). So any data-parallel size sees the same global batches and resuming is
restarting at `consumed_samples`. Sample j of the stream is sample j % N of the index (N =
max_steps * global_batch_size) in epoch j // N; FIM draws are keyed on (seed, split, epoch, j % N).

Fine-tuning data (sources with a loss mask) is read as rows of examples instead
(starcoder.data.packing), in the same order: stream position j is row j % R of epoch j // R.
Under `train.objective dpo` a position is a preference pair (two rows).
With document masking (`data.document_mask`) a micro-batch also carries "document_ids".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from starcoder.config import Config, ConfigError, UserError, accumulation_steps
from starcoder.data.binding import check_tokenizer, recorded
from starcoder.data.dataset import BlendedSamples, IndexCache, blended_samples, writable_dir
from starcoder.data.fim import FimTransform, sample_rng
from starcoder.data.packing import (ExampleBatches, PairBatches, example_rows, loss_mask_prefix,
                                    preference_pairs)
from starcoder.data.tokenizer import MissingTokenError, Tokenizer

TRAIN, VALID = 0, 1
log = logging.getLogger(__name__)


class Recycler:
    """Arrays of one shape, reusing one only once nothing else references it: a tensor made by
    `torch.from_numpy` (or any view of it) holds its array until the last view dies, so an array
    whose reference count is what a free one counts is free. Fresh half-megabyte arrays cost more
    in page faults than the copy that fills them."""

    def __init__(self, shape: tuple, dtype, keep: int = 4):
        self.shape, self.dtype, self.keep, self.arrays = shape, dtype, keep, []
        # Measured, not assumed: how the interpreter counts references differs between versions.
        self._free_refs = self._refs([np.empty(0)], 0)

    @staticmethod
    def _refs(arrays: list, i: int) -> int:
        return sys.getrefcount(arrays[i])

    def get(self) -> np.ndarray:
        for i in range(len(self.arrays)):
            if self._refs(self.arrays, i) == self._free_refs:
                return self.arrays[i]
        arr = np.empty(self.shape, self.dtype)
        if len(self.arrays) < self.keep:
            self.arrays.append(arr)
        return arr


class MicroBatches(torch.utils.data.Dataset):
    """Turns a list of stream positions into one micro-batch dict (what DataLoader workers run)."""

    def __init__(self, samples: BlendedSamples, seq_length: int, fim: Optional[FimTransform],
                 seed: int, split: int, eod: int, pad: Optional[int], mask_eod: bool, mask_pad: bool,
                 document_ids: bool = False):
        self.samples, self.width, self.fim = samples, seq_length + 1, fim
        self.seed, self.split = seed, split
        self.eod, self.pad, self.mask_eod, self.mask_pad = eod, pad, mask_eod, mask_pad
        self.document_ids = document_ids
        self._buffers: dict = {}

    def _buffer(self, shape: tuple, dtype) -> np.ndarray:
        key = (shape, np.dtype(dtype).str)
        if key not in self._buffers:
            self._buffers[key] = Recycler(shape, dtype)
        return self._buffers[key].get()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, positions: list[int]) -> dict:
        positions = np.asarray(positions, dtype=np.int64)
        n = len(self.samples)
        tokens = self.samples.gather(positions % n, self.width,
                                     out=self._buffer((len(positions), self.width), np.int64))
        if self.fim is not None:
            for row, j in enumerate(positions.tolist()):
                rng = sample_rng(self.seed, self.split, j // n, j % n)
                tokens[row] = self.fim(tokens[row], rng)
        # NumPy, not torch: torch's intra-op threads cost milliseconds per call on a busy host.
        loss_mask = self._buffer((len(positions), self.width - 1), np.float32)
        loss_mask.fill(1.0)
        if self.mask_eod:  # Megatron's --eod-mask-loss: no loss where the input token is EOD
            loss_mask[tokens[:, :-1] == self.eod] = 0.0
        if self.mask_pad and self.pad is not None:  # never learn to emit <fim_pad>
            loss_mask[tokens[:, 1:] == self.pad] = 0.0
        batch = {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(loss_mask)}
        if self.document_ids:  # a document ends with its EOD; the next token starts the next one
            docs = np.zeros(tokens.shape, dtype=np.int64)
            np.cumsum(tokens[:, :-1] == self.eod, axis=1, out=docs[:, 1:])
            batch["document_ids"] = torch.from_numpy(docs)
        return batch


def pretraining_order(start: int, stop: Optional[int], micro: int, dp_rank: int,
                      dp_size: int) -> Iterator[list[int]]:
    """This rank's micro-batches of stream positions from `start` (MegatronPretrainingSampler)."""
    step = micro * dp_size
    first = start
    while stop is None or first + step <= stop:
        yield list(range(first + dp_rank * micro, first + (dp_rank + 1) * micro))
        first += step


def _identity(batch):
    return batch


def _worker_init(_):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(1)


def _iterate(dataset, order: Iterator[list[int]], workers: int, seed: int) -> Iterator[dict]:
    if workers == 0 or getattr(dataset, "fim", None) is None:
        # Without FIM a micro-batch is one C++ copy: faster in-process than any worker hand-off.
        for positions in order:
            yield dataset[positions]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers,
                                         collate_fn=_identity, worker_init_fn=_worker_init,
                                         prefetch_factor=4,
                                         # Its own generator: drawing the workers' base seed from
                                         # the global one would shift dropout after a resume.
                                         generator=torch.Generator().manual_seed(seed))
    yield from loader


def _check(cfg: Config, dp_rank: int, dp_size: int) -> None:
    t, d = cfg.train, cfg.data
    if not d.paths:
        raise ConfigError("data.paths: no training data given (a list of .bin/.idx prefixes, "
                          "optionally weighted); make some with `starcoder preprocess`")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
    accumulation_steps(t, dp_size)


def _fim(cfg: Config, tokenizer: Tokenizer) -> Optional[FimTransform]:
    d = cfg.data
    if d.fim_rate <= 0:
        return None
    try:
        return FimTransform(tokenizer, d.fim_rate, d.fim_spm_rate, d.fim_split_sample, d.fragment_fim_rate)
    except MissingTokenError as err:
        key = "data.fim_split_sample" if d.fim_split_sample and d.fim_split_sample in str(err) else "data.fim_rate"
        raise ConfigError(f"{key}: {err}") from None


def is_finetune_data(cfg: Config) -> bool:
    """Whether `data.paths` is fine-tuning data (every source has a loss mask) or pretraining
    data (none has); a mixture, or preference pairs without `train.objective dpo` (or dpo
    without them), is a ConfigError."""
    d = cfg.data
    if not d.paths:
        return False
    masked = [loss_mask_prefix(s.path) is not None for s in d.paths]
    if any(masked) and not all(masked):
        ft, pt = d.paths[masked.index(True)].path, d.paths[masked.index(False)].path
        raise ConfigError(f"data.paths: {ft} is fine-tuning data (it has a loss mask) but {pt} is "
                          "pretraining data; train on one kind at a time")
    if not any(masked):
        return False
    dpo = cfg.train.objective == "dpo"
    for i, s in enumerate(d.paths):
        if (recorded(s.path).get("format") == "preference") != dpo:
            raise ConfigError(f"data.paths[{i}]: {s.path} holds preference pairs (--format "
                              "preference), which only train.objective dpo reads" if not dpo else
                              f"data.paths[{i}]: {s.path} is not preference data (starcoder "
                              "preprocess --format preference), which train.objective dpo needs")
        if s.weight != 1.0:
            raise ConfigError(f"data.paths[{i}].weight: fine-tuning sources are concatenated, each "
                              f"example once per epoch; weights are not supported (got {s.weight})")
    return True


def document_mask_enabled(cfg: Config) -> bool:
    """`data.document_mask`, whose default is on when packing fine-tuning data."""
    d = cfg.data
    if d.document_mask is not None:
        return d.document_mask
    return d.pack and is_finetune_data(cfg)


def check_objective(cfg: Config, finetune: bool) -> None:
    """The data fits `train.objective`, `train.loss_normalization`, `train.epochs`, `data.pack`."""
    t, d = cfg.train, cfg.data
    what = "pretraining data (no loss mask)"
    if finetune:
        if d.fim_rate > 0:
            raise ConfigError("data.fim_rate: fill-in-the-middle applies to pretraining data, not "
                              "to fine-tuning examples; set 0")
        return
    for key, value, used in (("train.objective", t.objective, t.objective in ("sft", "dpo")),
                             ("train.loss_normalization", t.loss_normalization,
                              t.loss_normalization == "example"),
                             ("train.epochs", t.epochs, t.epochs is not None)):
        if used:
            raise ConfigError(f"{key}: {value} needs fine-tuning data with a loss mask (starcoder "
                              f"preprocess --format instruct | commit | chat), but data.paths is {what}")
    if d.pack:
        raise ConfigError(f"data.pack: data.paths is {what}, which is always packed into "
                          "sequences (Megatron's windows); the key is for fine-tuning data")


def _rows_for(cfg: Config, split: int):
    """The split's examples and its rows (preference pairs under `train.objective dpo`)."""
    d, t = cfg.data, cfg.train
    try:
        if t.objective == "dpo":
            return preference_pairs([s.path for s in d.paths], d.split, split, t.seq_length)
        return example_rows([s.path for s in d.paths], d.split, split, t.seq_length, d.pack, t.seed,
                            t.objective == "sft")
    except (FileNotFoundError, ValueError) as err:  # a missing or unreadable .bin/.idx
        raise ConfigError(f"data.paths: {err}") from None


def resolve_epochs(cfg: Config) -> Config:
    """`cfg` with `train.max_steps` set from `train.epochs`: ceil(epochs x rows of the training
    split / global_batch_size) steps. Unchanged without `train.epochs`."""
    t = cfg.train
    if t.epochs is None:
        return cfg
    check_objective(cfg, is_finetune_data(cfg))
    _, rows = _rows_for(cfg, TRAIN)
    if not len(rows):
        raise ConfigError(f"data.split: {cfg.data.split!r} leaves no training examples")
    steps = math.ceil(t.epochs * len(rows) / t.global_batch_size)
    log.info("train.epochs %d: %d rows per epoch, %d steps of %d (train.max_steps %d is not used)",
             t.epochs, len(rows), steps, t.global_batch_size, t.max_steps)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=steps))


def cache_for(cfg: Config) -> IndexCache:
    if cfg.data.cache_dir:
        return IndexCache(Path(cfg.data.cache_dir))
    beside = Path(cfg.data.paths[0].path).resolve().parent / "index_cache"
    if writable_dir(beside):
        return IndexCache(beside)
    return IndexCache(Path(cfg.train.output_dir) / "index_cache")


def build_samples(cfg: Config, split: int, num_samples: int) -> Optional[BlendedSamples]:
    """Build the indices on global rank 0 behind a barrier, then load them everywhere (a rank that
    still misses them, e.g. with a node-local cache, builds its own identical copy)."""
    d, t = cfg.data, cfg.train
    args = ([s.path for s in d.paths], [s.weight for s in d.paths], split, d.split, num_samples,
            t.seq_length, t.seed, cache_for(cfg))
    try:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if dist and torch.distributed.get_rank() != 0:
            torch.distributed.barrier()
            return blended_samples(*args)
        samples = blended_samples(*args)
        if dist:
            torch.distributed.barrier()
        return samples
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as err:  # a missing or unreadable .bin/.idx
        raise ConfigError(f"data.paths: {err}") from None


def _build(cfg: Config, tokenizer: Tokenizer, split: int, num_samples: int):
    finetune = is_finetune_data(cfg)
    check_objective(cfg, finetune)
    documents = document_mask_enabled(cfg)
    if finetune:
        t = cfg.train
        examples, rows = _rows_for(cfg, split)
        if not len(rows):
            return None
        if t.objective == "dpo":
            return PairBatches(examples, rows, t.seq_length, t.seed, split, tokenizer.eod_id)
        return ExampleBatches(examples, rows, t.seq_length, t.seed, split, tokenizer.eod_id,
                              t.objective == "sft", t.loss_normalization == "example", documents)
    fim = _fim(cfg, tokenizer)
    samples = build_samples(cfg, split, num_samples)
    if samples is None:
        return None
    try:
        pad = tokenizer.fim_id("pad") if fim is not None or cfg.data.mask_fim_pad_loss else None
    except MissingTokenError as err:
        raise ConfigError(f"data.mask_fim_pad_loss: {err}") from None
    return MicroBatches(samples, cfg.train.seq_length, fim, cfg.train.seed, split, tokenizer.eod_id,
                        pad, cfg.data.mask_eod_loss, cfg.data.mask_fim_pad_loss, documents)


def build_pair_dataset(cfg: Config, tokenizer: Tokenizer) -> PairBatches:
    """The training split's preference pairs (`train.objective dpo`), to read by pair number."""
    dataset = _build(cfg, tokenizer, TRAIN, 0)
    if dataset is None:
        raise ConfigError(f"data.split: {cfg.data.split!r} leaves no training pairs")
    return dataset


def build_valid_pairs(cfg: Config, tokenizer: Tokenizer) -> Optional[tuple[PairBatches, list[int]]]:
    """The validation split's preference pairs and the numbers of those `build_valid_loader`
    reads (its first train.eval_steps x train.global_batch_size stream positions, in order);
    None when `data.split` gives validation no pairs."""
    t = cfg.train
    num_samples = t.eval_steps * t.global_batch_size
    dataset = _build(cfg, tokenizer, VALID, num_samples)
    if dataset is None:
        return None
    return dataset, dataset.pair_numbers(range(num_samples))


def build_train_loader(cfg: Config, tokenizer: Tokenizer, *, dp_rank: int, dp_size: int,
                       consumed_samples: int) -> Iterator[dict]:
    _check(cfg, dp_rank, dp_size)
    try:  # before any token is read: another tokenizer's ids would train silently or crash in FIM
        check_tokenizer([s.path for s in cfg.data.paths], tokenizer, cache_for(cfg).folder)
    except (UserError, FileNotFoundError) as err:
        raise ConfigError(f"data.paths: {err}") from None
    t = cfg.train
    dataset = _build(cfg, tokenizer, TRAIN, t.max_steps * t.global_batch_size)
    if dataset is None:
        raise ConfigError(f"data.split: {cfg.data.split!r} leaves no training documents")
    order = pretraining_order(consumed_samples, None, t.micro_batch_size, dp_rank, dp_size)
    return _iterate(dataset, order, cfg.data.num_workers, cfg.train.seed)


def build_valid_loader(cfg: Config, tokenizer: Tokenizer, *, dp_rank: int, dp_size: int
                       ) -> Optional[Iterator[dict]]:
    _check(cfg, dp_rank, dp_size)
    t = cfg.train
    num_samples = t.eval_steps * t.global_batch_size
    dataset = _build(cfg, tokenizer, VALID, num_samples)
    if dataset is None:
        return None
    order = pretraining_order(0, num_samples, t.micro_batch_size, dp_rank, dp_size)
    return _iterate(dataset, order, cfg.data.num_workers, cfg.train.seed)
