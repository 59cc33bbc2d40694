"""Fine-tuning examples as training rows: one example padded to the row, or several packed.

A fine-tuning source is a `.bin/.idx` of examples (one sequence each) with its loss mask beside it
(`PREFIX_loss_mask`, named in PREFIX.json; see starcoder.data.preprocess). Sources are concatenated
and each split takes its document range of every source (Megatron's split rule). A row has
`seq_length + 1` tokens, as a pretraining sample.

- An example longer than the row is **truncated** to it (its first `seq_length + 1` tokens: the
  prompt and the start of the response); one left without a loss token is **dropped**. Both are
  counted (`Rows.truncated`, `Rows.dropped`) and logged.
- Without packing each row holds one example; with `data.pack` examples are placed best-fit (the
  fullest row that still has room) in an order shuffled from the seed, so the rows are the same on
  every rank and in every run. The rest of a row is EOD padding, which carries no loss.
- Rows are shuffled again every epoch (from seed, split and epoch); stream position j is row
  `perm_e[j % R]` of epoch `e = j // R`, so any position can be read directly and resuming at
  `consumed_samples` repeats the uninterrupted run exactly.

Each micro-batch has "tokens" (int64 [micro, seq+1]) and "loss_mask" (float32 [micro, seq], for
the label tokens[:, 1:]): 1 where the label is a target token of the same example as its input
(`train.objective sft`; with `lm` every token of an example), 0 on padding and across example
boundaries. With `train.loss_normalization example` the mask holds 1 / (the example's loss
tokens) instead, so the trainer's normalisation by the mask's sum averages examples. With document
masking it also has "document_ids" (int64 [micro, seq+1], nondecreasing: examples 0, 1, ... in
row order, the padding one id more).

Preference data (`train.objective dpo`) is read as pairs instead (`PairBatches`): never packed, a
micro-batch of m pairs is 2m padded rows, chosen and rejected side by side.
"""

from __future__ import annotations

import bisect
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from starcoder.data.binding import recorded
from starcoder.data.dataset import file_identity, split_ranges
from starcoder.data.indexed import IndexedMask, IndexedTokens

log = logging.getLogger(__name__)


def loss_mask_prefix(prefix: str) -> Optional[str]:
    """The loss-mask dataset of a fine-tuning source (from its PREFIX.json), else None."""
    name = recorded(prefix).get("loss_mask")
    return str(Path(prefix).parent / name) if name else None


@dataclass
class Rows:
    """Which examples each row holds: examples `items[ptr[r]:ptr[r+1]]` of row r, in order, with
    their (possibly truncated) lengths; examples are numbered across sources."""

    ptr: np.ndarray  # int64 [R + 1]
    items: np.ndarray  # int64 example numbers
    lengths: np.ndarray  # int64 tokens of each item in the row
    truncated: int
    dropped: int

    def __len__(self) -> int:
        return len(self.ptr) - 1


def place(lengths: np.ndarray, width: int, pack: bool, seed: int, split: int) -> Rows:
    """Rows of at most `width` tokens for examples of `lengths` (already at most `width`): one
    example per row in order, or packed best-fit over a seeded shuffle."""
    n = len(lengths)
    if not pack:
        return Rows(np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64),
                    np.asarray(lengths, dtype=np.int64), 0, 0)
    order = np.random.default_rng([seed, split, 1]).permutation(n)
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: best fit is the first that fits
    for ex in order.tolist():
        need = int(lengths[ex])
        i = bisect.bisect_left(free, (need, -1))
        if i < len(free):
            room, r = free.pop(i)
        else:
            room, r = width, len(rows)
            rows.append([])
        rows[r].append(ex)
        if room - need > 0:
            bisect.insort(free, (room - need, r))
    items = np.fromiter((ex for row in rows for ex in row), dtype=np.int64, count=n)
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=ptr[1:])
    return Rows(ptr, items, np.asarray(lengths, dtype=np.int64)[items], 0, 0)


class Examples:
    """The examples of one split of the fine-tuning sources, numbered in source order. With
    `pairs` (preference data) the split divides pairs, so examples 2k and 2k + 1 are the chosen and
    rejected sequences of pair k."""

    def __init__(self, prefixes: list[str], split_spec: str, split: int, pairs: bool = False):
        self.tokens, self.masks, self.source, self.sequence = [], [], [], []
        for s, prefix in enumerate(prefixes):
            data = IndexedTokens(prefix)
            mask = IndexedMask(loss_mask_prefix(prefix))
            if not np.array_equal(np.asarray(mask.sizes), np.asarray(data.sizes)):
                raise ValueError(f"{mask.prefix}: its sizes differ from {prefix}'s tokens; "
                                 "preprocess the data again")
            if pairs:
                first, last = (2 * b for b in split_ranges(split_spec, len(data) // 2)[split])
            else:
                first, last = split_ranges(split_spec, len(data))[split]
            self.tokens.append(data)
            self.masks.append(mask)
            self.source.append(np.full(last - first, s, dtype=np.int64))
            self.sequence.append(np.arange(first, last, dtype=np.int64))
        self.source = np.concatenate(self.source)
        self.sequence = np.concatenate(self.sequence)

    def __len__(self) -> int:
        return len(self.source)

    def lengths(self) -> np.ndarray:
        """Tokens of every example (sources are contiguous in the numbering)."""
        out = np.zeros(len(self), dtype=np.int64)
        for s, data in enumerate(self.tokens):
            rows = self.source == s
            out[rows] = np.asarray(data.sizes)[self.sequence[rows]]
        return out

    def get(self, ex: int) -> tuple[np.ndarray, np.ndarray]:
        s, i = int(self.source[ex]), int(self.sequence[ex])
        return self.tokens[s][i], self.masks[s][i]


@functools.lru_cache(maxsize=4)
def _rows(key: tuple, prefixes: tuple, split_spec: str, split: int, width: int, pack: bool,
          seed: int, sft: bool) -> tuple[Examples, Rows]:
    """`key` holds the sources' file identities, so a changed file is placed again."""
    examples = Examples(list(prefixes), split_spec, split)
    lengths = examples.lengths()
    long = np.flatnonzero(lengths > width)
    keep = np.ones(len(lengths), dtype=bool)
    for ex in long.tolist():  # dropped if truncation leaves no loss token (position 0 has none)
        _, mask = examples.get(ex)
        keep[ex] = not sft or bool(np.any(mask[1:width]))
    clipped = np.minimum(lengths, width)
    kept = np.flatnonzero(keep)
    rows = place(clipped[kept], width, pack, seed, split)
    rows.items = kept[rows.items]
    rows.truncated, rows.dropped = len(long), int(len(keep) - len(kept))
    if rows.truncated:
        log.warning("%d of %d examples are longer than train.seq_length + 1 (%d tokens): truncated "
                    "to it; %d of them kept no loss token and were dropped", rows.truncated,
                    len(lengths), width, rows.dropped)
    return examples, rows


def example_rows(prefixes: list[str], split_spec: str, split: int, seq_length: int, pack: bool,
                 seed: int, sft: bool) -> tuple[Examples, Rows]:
    """The examples of a split and their rows (cached per process)."""
    key = tuple(tuple(sorted((k, str(v)) for k, v in file_identity(p).items())) for p in prefixes)
    return _rows(key, tuple(prefixes), split_spec, split, seq_length + 1, pack, seed, sft)


class _EpochShuffled(torch.utils.data.Dataset):
    """Items (rows, or pairs) in a fresh order each epoch, drawn from (seed, split, epoch): stream
    position j is item `order(j // n)[j % n]`, so a resume at any position is exact."""

    _epoch, _perm = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The item order of an epoch."""
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, self.split, 2, epoch]).permutation(len(self))
            self._epoch = epoch
        return self._perm


class ExampleBatches(_EpochShuffled):
    """Turns a list of stream positions into one micro-batch dict of fine-tuning rows."""

    def __init__(self, examples: Examples, rows: Rows, seq_length: int, seed: int, split: int,
                 eod: int, sft: bool, per_example: bool, document_ids: bool):
        self.examples, self.rows, self.width = examples, rows, seq_length + 1
        self.seed, self.split, self.eod = seed, split, eod
        self.sft, self.per_example, self.document_ids = sft, per_example, document_ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: list[int]) -> dict:
        micro, width, n = len(positions), self.width, len(self.rows)
        tokens = np.full((micro, width), self.eod, dtype=np.int64)
        target = np.zeros((micro, width), dtype=np.float32)
        docs = np.zeros((micro, width), dtype=np.int64)
        for b, j in enumerate(positions):
            row = int(self.order(j // n)[j % n])
            lo, hi = int(self.rows.ptr[row]), int(self.rows.ptr[row + 1])
            at = 0
            for d, (ex, length) in enumerate(zip(self.rows.items[lo:hi].tolist(),
                                                 self.rows.lengths[lo:hi].tolist())):
                ids, mask = self.examples.get(ex)
                tokens[b, at:at + length] = ids[:length]
                target[b, at:at + length] = mask[:length] if self.sft else 1.0
                docs[b, at:at + length] = d
                at += length
            docs[b, at:] = hi - lo  # the padding: its own document, no loss
        # The label tokens[:, t + 1] counts when it is a target of the input token's own example.
        loss_mask = target[:, 1:] * (docs[:, 1:] == docs[:, :-1])
        if self.per_example:
            for b in range(micro):
                counts = np.bincount(docs[b, 1:], weights=loss_mask[b])
                owner = counts[docs[b, 1:]]
                loss_mask[b] = np.divide(loss_mask[b], owner, out=np.zeros_like(loss_mask[b]),
                                         where=owner > 0)
        batch = {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(loss_mask)}
        if self.document_ids:
            batch["document_ids"] = torch.from_numpy(docs)
        return batch


# --------------------------------------------------------------------------------------------
# Preference pairs (train.objective dpo)


@dataclass
class Pairs:
    """The pairs of a split that keep a loss token in both sequences after truncation to the row
    (`kept[k]`: the pair number in `Examples`; examples 2 kept[k] and 2 kept[k] + 1)."""

    kept: np.ndarray  # int64
    truncated: int  # pairs with a sequence longer than the row
    dropped: int  # of those, pairs left without a loss token in either sequence

    def __len__(self) -> int:
        return len(self.kept)


@functools.lru_cache(maxsize=4)
def _pairs(key: tuple, prefixes: tuple, split_spec: str, split: int, width: int
           ) -> tuple[Examples, Pairs]:
    examples = Examples(list(prefixes), split_spec, split, pairs=True)
    lengths = examples.lengths().reshape(-1, 2)
    long = np.flatnonzero((lengths > width).any(axis=1))
    keep = np.ones(len(lengths), dtype=bool)
    for k in long.tolist():
        keep[k] = all(np.any(examples.get(2 * k + s)[1][1:width]) for s in (0, 1))
    pairs = Pairs(np.flatnonzero(keep), len(long), int(len(keep) - keep.sum()))
    if pairs.truncated:
        log.warning("%d of %d preference pairs have a sequence longer than train.seq_length + 1 "
                    "(%d tokens): truncated to it; %d of them kept no loss token and were dropped",
                    pairs.truncated, len(keep), width, pairs.dropped)
    return examples, pairs


def preference_pairs(prefixes: list[str], split_spec: str, split: int, seq_length: int
                     ) -> tuple[Examples, Pairs]:
    """The preference pairs of a split (cached per process)."""
    key = tuple(tuple(sorted((k, str(v)) for k, v in file_identity(p).items())) for p in prefixes)
    return _pairs(key, tuple(prefixes), split_spec, split, seq_length + 1)


class PairBatches(_EpochShuffled):
    """Micro-batches of preference pairs: stream position j is pair `perm_e[j % P]` of epoch
    e = j // P (shuffled as `ExampleBatches` shuffles rows), and a micro-batch of m positions has
    2m rows, the chosen sequence of its b-th pair in row 2b and the rejected one in row 2b + 1,
    each padded with EOD. Besides "tokens" and "loss_mask" (the stored mask) it has "pair_index"
    (int64 [m], the pair's number in the split: what a precomputed reference is keyed by)."""

    def __init__(self, examples: Examples, pairs: Pairs, seq_length: int, seed: int, split: int,
                 eod: int):
        self.examples, self.pairs, self.width = examples, pairs, seq_length + 1
        self.seed, self.split, self.eod = seed, split, eod

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, positions: list[int]) -> dict:
        return self.batch(self.pair_numbers(positions))

    def pair_numbers(self, positions) -> list[int]:
        """The pairs (numbers in the split) at these stream positions."""
        n = len(self.pairs)
        return [int(self.order(j // n)[j % n]) for j in positions]

    def batch(self, pair_index: list[int]) -> dict:
        """The micro-batch of these pairs (numbers in the split)."""
        rows, width = 2 * len(pair_index), self.width
        tokens = np.full((rows, width), self.eod, dtype=np.int64)
        target = np.zeros((rows, width), dtype=np.float32)
        for b, k in enumerate(pair_index):
            for s in (0, 1):
                ids, mask = self.examples.get(2 * int(self.pairs.kept[k]) + s)
                length = min(len(ids), width)
                tokens[2 * b + s, :length] = ids[:length]
                target[2 * b + s, :length] = mask[:length]
        return {"tokens": torch.from_numpy(tokens),
                "loss_mask": torch.from_numpy(np.ascontiguousarray(target[:, 1:])),
                "pair_index": torch.tensor(pair_index, dtype=torch.int64)}
