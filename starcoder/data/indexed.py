"""Megatron's memory-mapped `.bin/.idx` token files (byte-compatible with megatron-core 0.16's
`IndexedDataset`, spec §6.4).

`.bin`: the tokens of every sequence back to back (uint16 when the vocabulary fits, else int32).
`.idx`: magic, version 1, dtype code (megatron-core's codes), sequence count, document count, then
int32 sizes, int64 byte pointers and int64 document boundaries. We write one sequence per document,
as Megatron's preprocess does without sentence splitting, so sequences are documents.

The writer stages both files under temporary names and renames the `.idx` last: an interrupted run
leaves no `.idx`, so nothing can mistake a partial `.bin` for a finished dataset.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
# megatron-core's DType codes (it swaps 6/7 relative to legacy Megatron; token data never uses them).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER = len(MAGIC) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Megatron's rule), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedWriter:
    """Append documents, then `finish()`; `abort()` (or an exception inside `with`) removes the
    staged files and leaves any earlier dataset at the prefix untouched until `finish()`."""

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._bin_tmp = f"{self.prefix}.bin.tmp-{os.getpid()}"
        self._idx_tmp = f"{self.prefix}.idx.tmp-{os.getpid()}"
        Path(self._bin_tmp).parent.mkdir(parents=True, exist_ok=True)
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

    def finish(self) -> None:
        self._bin.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        write_index(self._idx_tmp, sizes, self.dtype)
        # Replace an older dataset safely: drop its .idx first, then publish .bin, then .idx.
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.abort()


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

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path = self.prefix + ".idx"
        if not os.path.isfile(idx_path):
            raise FileNotFoundError(f"{idx_path}: no such index file (is the prefix right, and did "
                                    "preprocessing finish?)")
        with open(idx_path, "rb") as f:
            head = f.read(HEADER)
        if len(head) < HEADER or head[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{idx_path}: not a Megatron mmap index (bad magic)")
        version, = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise ValueError(f"{idx_path}: unsupported index version {version}")
        code = head[17]
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        count, doc_count = struct.unpack("<QQ", head[18:34])
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        need = HEADER + 12 * count + 8 * doc_count
        if idx.size < need:
            raise ValueError(f"{idx_path}: truncated ({idx.size} bytes, need {need})")
        self.sizes = idx[HEADER:HEADER + 4 * count].view(np.int32)
        self.pointers = idx[HEADER + 4 * count:HEADER + 12 * count].view(np.int64)
        self.doc_idx = idx[HEADER + 12 * count:need].view(np.int64)
        bin_path = self.prefix + ".bin"
        bin_bytes = os.path.getsize(bin_path)
        expected = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if count else 0
        if bin_bytes < expected:
            raise ValueError(f"{bin_path}: {bin_bytes} bytes, but the index describes {expected}")
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_bytes
                       else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    def __reduce__(self):  # pickled by name (spawned workers map the files again)
        return IndexedTokens, (self.prefix,)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))
