"""Megatron's memory-mapped `.bin/.idx` token files (byte-compatible with megatron-core 0.16's
`IndexedDataset`, spec §6.4).

`.bin`: the tokens of every sequence back to back (uint16 when the vocabulary fits, else int32).
`.idx`: magic, version 1, dtype code (megatron-core's codes), sequence count, document count, then
int32 sizes, int64 byte pointers and int64 document boundaries. We write one sequence per document,
as Megatron's preprocess does without sentence splitting, so sequences are documents; preference
data is the exception, one document of two sequences (chosen, rejected) per pair.

Fine-tuning data has a second dataset beside it, `PREFIX_loss_mask.bin/.idx` (uint8, the same
sizes): 1 where the token carries the loss. Both are megatron-core datasets.

The writer stages every file under a temporary name and renames the `.idx` last: an interrupted
run leaves no `.idx`, so nothing can mistake a partial `.bin` for a finished dataset. The staged
files of a killed run (`PREFIX.bin.tmp-PID`) are removed by the next writer of that prefix.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path

import numpy as np

from starcoder.config import UserError

MAGIC = b"MMIDIDX\x00\x00"
# megatron-core's DType codes (it swaps 6/7 relative to legacy Megatron; token data never uses them).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
# What token files hold: Megatron's preprocess writes uint16 below 65500 ids, else int32.
TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.int32))
HEADER = len(MAGIC) + 8 + 1 + 8 + 8
CHECK_ROWS = 1 << 22  # index entries validated per pass (bounded memory for huge indices)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Megatron's rule), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedWriter:
    """Append documents, then `finish()`; `abort()` (or an exception inside `with`) removes the
    staged files and leaves any earlier dataset at the prefix untouched until `finish()`."""

    def __init__(self, prefix: str | Path, dtype: np.dtype, sequences_per_document: int = 1):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self.sequences_per_document = sequences_per_document
        self._bin_tmp = f"{self.prefix}.bin.tmp-{os.getpid()}"
        self._idx_tmp = f"{self.prefix}.idx.tmp-{os.getpid()}"
        self._json_tmp = f"{self.prefix}.json.tmp-{os.getpid()}"
        Path(self._bin_tmp).parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.prefix)
        self._bin = open(self._bin_tmp, "wb")
        self._sizes: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0

    def add_document(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes())
        self._sizes.append(np.array([arr.size], dtype=np.int32))
        self.documents += 1
        self.tokens += arr.size

    def add_documents(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        """Many documents at once: `flat` holds their tokens back to back."""
        self._bin.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self._sizes.append(np.asarray(sizes, dtype=np.int32))
        self.documents += len(sizes)
        self.tokens += int(flat.size)

    def finish(self, report: dict | None = None) -> None:
        """Publish the dataset, with `report` as PREFIX.json (the provenance the loader checks)."""
        self._bin.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        k = self.sequences_per_document
        if len(sizes) % k:
            raise ValueError(f"{len(sizes)} sequences do not make documents of {k}")
        write_index(self._idx_tmp, sizes, self.dtype, np.arange(0, len(sizes) + 1, k, dtype=np.int64))
        if report is not None:
            with open(self._json_tmp, "w") as f:
                json.dump(report, f, indent=1)
        # Replace an older dataset safely: drop its .idx first, then publish .bin (and .json),
        # then .idx.
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self._bin_tmp, self.prefix + ".bin")
        if report is not None:
            os.replace(self._json_tmp, self.prefix + ".json")
        os.replace(self._idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp, self._json_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Remove `PREFIX.{bin,idx,json}.tmp-PID` files whose process no longer runs (a killed run)."""
    removed = []
    for path in glob.glob(glob.escape(prefix) + ".*.tmp-*"):
        pid = path.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid)):
            os.remove(path)
            removed.append(path)
    return removed


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_index(path: str, sizes: np.ndarray, dtype: np.dtype, doc_idx: np.ndarray | None = None) -> None:
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    if doc_idx is None:
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODE_OF[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(doc_idx, dtype=np.int64).tobytes())


class IndexedTokens:
    """Read a `.bin/.idx` pair (ours or Megatron's) without loading it: everything is mmapped.

    `sizes[i]`, `pointers[i]` describe sequence i; `doc_idx` is Megatron's document boundary list.
    `tokens` is the whole `.bin` as one 1-D array.
    """

    DTYPES = TOKEN_DTYPES
    WHAT = "token files hold uint16 or int32, as Megatron's preprocess writes them"

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path = self.prefix + ".idx"
        if not os.path.isfile(idx_path):
            raise FileNotFoundError(f"{idx_path}: no such index file (is the prefix right, and did "
                                    "preprocessing finish?)")
        with open(idx_path, "rb") as f:
            head = f.read(HEADER)
        if len(head) < HEADER or head[:len(MAGIC)] != MAGIC:
            raise UserError(f"{idx_path}: not a Megatron mmap index (bad magic)")
        version, = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise UserError(f"{idx_path}: unsupported index version {version}")
        code = head[17]
        if code not in DTYPE_CODES:
            raise UserError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        if self.dtype not in self.DTYPES:
            raise UserError(f"{idx_path}: dtype {self.dtype.name} is not supported ({self.WHAT})")
        count, doc_count = struct.unpack("<QQ", head[18:34])
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        need = HEADER + 12 * count + 8 * doc_count
        if idx.size < need:
            raise UserError(f"{idx_path}: truncated ({idx.size} bytes, need {need})")
        self.sizes = idx[HEADER:HEADER + 4 * count].view(np.int32)
        self.pointers = idx[HEADER + 4 * count:HEADER + 12 * count].view(np.int64)
        self.doc_idx = idx[HEADER + 12 * count:need].view(np.int64)
        self._check_body(idx_path)
        bin_path = self.prefix + ".bin"
        bin_bytes = os.path.getsize(bin_path)
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if count else 0
        if bin_bytes < expected:
            raise UserError(f"{bin_path}: {bin_bytes} bytes, but the index describes {expected}")
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_bytes
                       else np.zeros(0, self.dtype))

    def _check_body(self, idx_path: str) -> None:
        """Sizes non-negative, pointers their running byte sum, document boundaries ascending from
        0 to the sequence count: one pass in blocks, so a garbage body is reported as such."""
        item, count = self.dtype.itemsize, len(self.sizes)
        end = 0  # the byte pointer the next sequence must start at
        for lo in range(0, count, CHECK_ROWS):
            sizes = np.asarray(self.sizes[lo:lo + CHECK_ROWS], dtype=np.int64)
            pointers = np.asarray(self.pointers[lo:lo + CHECK_ROWS])
            starts = end + np.concatenate(([0], np.cumsum(sizes[:-1]) * item))
            if sizes.min() < 0 or not np.array_equal(pointers, starts):
                bad = lo + int(np.flatnonzero((sizes < 0) | (pointers != starts))[0])
                raise UserError(f"{idx_path}: corrupt index (sequence {bad}: size {int(self.sizes[bad])}, "
                                f"byte pointer {int(self.pointers[bad])}); preprocess the data again")
            end = int(starts[-1] + sizes[-1] * item)
        doc = self.doc_idx
        if len(doc) == 0 or doc[0] != 0 or doc[-1] != count or \
                any(np.any(np.diff(doc[lo:lo + CHECK_ROWS + 1]) < 0) for lo in range(0, len(doc), CHECK_ROWS)):
            raise UserError(f"{idx_path}: corrupt index (document boundaries are not ascending from 0 "
                            f"to {count}); preprocess the data again")

    def __len__(self) -> int:
        return len(self.sizes)

    def __reduce__(self):  # pickled by name (spawned workers map the files again)
        return type(self), (self.prefix,)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


class IndexedMask(IndexedTokens):
    """A `PREFIX_loss_mask` dataset: uint8, 1 where the token carries the loss."""

    DTYPES = (np.dtype(np.uint8),)
    WHAT = "loss-mask files hold uint8"
