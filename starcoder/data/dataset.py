"""Packed GPT samples over weighted blends of `.bin/.idx` sources, with cached indices.

Per source and split (a contiguous document range, Megatron's split rule) three indices are built
as megatron-core's GPTDataset does: the shuffled document order over enough epochs, the sample
index (windows of seq_length + 1 tokens, consecutive windows sharing one token) and the shuffled
sample order. A blend adds the per-sample (source, sample) choice. All are `.npy` files in a cache
folder, named by a hash of everything they depend on (the source files' size and mtime included),
so they are rebuilt exactly when an input changes and are memory-mapped on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from starcoder.config import ConfigError
from starcoder.data import helpers
from starcoder.data.indexed import IndexedTokens

INDEX_VERSION = 1
SPLITS = ("train", "valid", "test")
SURPLUS = 0.005
log = logging.getLogger(__name__)  # Megatron builds 0.5% more samples per blended source than its share


def split_ranges(split: str, num_docs: int) -> list[tuple[int, int]]:
    """Document ranges of train/valid/test for a "98,2,0"-style split (megatron-core's rounding)."""
    weights = [float(x) for x in split.replace("/", ",").split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w / total
        bounds.append(int(round(min(acc, 1.0) * num_docs)))
    bounds[-1] = num_docs
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def num_epochs_for(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """The fewest epochs whose tokens fill num_samples windows (megatron-core's rule)."""
    return max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))


def writable_dir(path: Path) -> bool:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


class PickledByFileName:
    """Pickles (for spawned DataLoader workers) memory-mapped .npy arrays as their file names."""

    def __getstate__(self) -> dict:
        return {k: ("npy", v.filename) if isinstance(v, np.memmap) and v.filename else v
                for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: np.load(v[1], mmap_mode="r") if isinstance(v, tuple) and v[:1] == ("npy",)
                              else v for k, v in state.items()})


@dataclass
class SourceSamples(PickledByFileName):
    """One source split's samples, in shuffled order: sample i is window shuffle_idx[i]."""

    name: str
    data: IndexedTokens
    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def gather(self, out: np.ndarray, rows: np.ndarray, samples: np.ndarray,
               backend: Optional[str] = None) -> None:
        windows = np.asarray(self.shuffle_idx[samples], dtype=np.int64)
        helpers.gather(out, rows, windows, self.data.tokens, self.data.pointers, self.data.sizes,
                       self.doc_idx, self.sample_idx, backend=backend)


class IndexCache:
    """Where index files live, and build-or-load with atomic writes."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def paths(self, stem: str, key: dict, names: tuple[str, ...]) -> dict[str, Path]:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return {n: self.folder / f"{stem}-{digest}-{n}.npy" for n in names} | \
            {"description": self.folder / f"{stem}-{digest}-description.json"}

    def load_or_build(self, stem: str, key: dict, names: tuple[str, ...],
                      build: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        paths = self.paths(stem, key, names)
        if all(paths[n].is_file() for n in names):
            try:
                return tuple(np.load(paths[n], mmap_mode="r") for n in names)
            except (ValueError, OSError, EOFError) as err:  # truncated or overwritten by hand
                log.warning("index cache %s is unreadable (%s): rebuilding it", self.folder,
                            " ".join(str(err).split()))
        start = time.perf_counter()
        arrays = build()
        log.info("built %s indices in %s (%.1fs)", stem, self.folder, time.perf_counter() - start)
        self.folder.mkdir(parents=True, exist_ok=True)
        for n, arr in zip(names, arrays):
            _save_atomic(paths[n], arr)
        tmp = paths["description"].with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
        os.replace(tmp, paths["description"])
        return tuple(np.load(paths[n], mmap_mode="r") for n in names)


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def file_identity(prefix: str) -> dict:
    ident = {"prefix": os.path.abspath(prefix)}
    for ext in (".idx", ".bin"):
        st = os.stat(prefix + ext)
        ident[ext[1:]] = [st.st_size, st.st_mtime_ns]
    return ident


def source_samples(data: IndexedTokens, split: int, doc_range: tuple[int, int], num_samples: int,
                   seq_length: int, seed: int, cache: IndexCache,
                   backend: Optional[str] = None) -> SourceSamples:
    """The (cached) indices of one source split, sized for at least num_samples samples."""
    first, last = doc_range
    sizes = np.asarray(data.sizes)
    tokens_per_epoch = int(sizes[first:last].sum(dtype=np.int64))
    if tokens_per_epoch <= 1:
        raise ConfigError(f"data.split: {data.prefix}: the {SPLITS[split]} split (documents "
                          f"{first}..{last}) has {tokens_per_epoch} tokens; it needs more than one")
    epochs = num_epochs_for(tokens_per_epoch, num_samples, seq_length)
    separate = False
    sans_last = (epochs * tokens_per_epoch - 1) // seq_length  # all samples, if not separated
    if epochs > 1:
        sans_last = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - sans_last < int(0.8 * per_epoch)
    key = {"version": INDEX_VERSION, "data": file_identity(data.prefix), "split": SPLITS[split],
           "documents": [first, last], "num_samples": num_samples, "seq_length": seq_length,
           "seed": seed}
    stream = 16 * (split + 1)

    def build():
        doc_idx, doc_sizes = helpers.document_index(first, last, epochs, separate, seed, stream, sizes, backend)
        total = (epochs * tokens_per_epoch - 1) // seq_length
        sample_idx = helpers.sample_index(doc_sizes, seq_length, total, backend)
        del doc_sizes
        shuffle_idx = helpers.shuffle_index(sans_last if separate else total, total, seed,
                                            stream + 2, backend)
        return doc_idx, sample_idx, shuffle_idx

    stem = f"{Path(data.prefix).name}-{SPLITS[split]}"
    arrays = cache.load_or_build(stem, key, ("doc_idx", "sample_idx", "shuffle_idx"), build)
    return SourceSamples(Path(data.prefix).name, data, *arrays)


class BlendedSamples(PickledByFileName):
    """Samples 0..len-1 drawn from weighted sources (or one source): sample i is
    sources[which[i]]'s sample within[i]."""

    def __init__(self, sources: list[SourceSamples], length: int,
                 which: Optional[np.ndarray] = None, within: Optional[np.ndarray] = None):
        self.sources, self.length, self.which, self.within = sources, length, which, within

    def __len__(self) -> int:
        return self.length

    def gather(self, indices: np.ndarray, width: int, backend: Optional[str] = None,
               out: Optional[np.ndarray] = None) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if out is None:
            out = np.empty((len(indices), width), dtype=np.int64)
        if self.which is None:
            self.sources[0].gather(out, np.arange(len(indices)), indices, backend)
            return out
        which = np.asarray(self.which[indices])
        within = np.asarray(self.within[indices])
        for s in np.unique(which):
            rows = np.flatnonzero(which == s)
            self.sources[s].gather(out, rows, within[rows], backend)
        return out


def blended_samples(prefixes: list[str], weights: list[float], split: int, split_spec: str,
                    num_samples: int, seq_length: int, seed: int, cache: IndexCache,
                    backend: Optional[str] = None) -> Optional[BlendedSamples]:
    """The samples of one split of the blend; None when the split has no documents."""
    datas = [IndexedTokens(p) for p in prefixes]
    ranges = [split_ranges(split_spec, len(d))[split] for d in datas]
    keep = [i for i, (a, b) in enumerate(ranges) if b > a]
    if not keep or num_samples <= 0:
        return None
    total_w = sum(weights[i] for i in keep)
    norm = [weights[i] / total_w for i in keep]
    if len(keep) == 1:
        sizes = [num_samples]
    else:
        sizes = [int(math.ceil(math.ceil(num_samples * w) * (1 + SURPLUS))) for w in norm]
    sources = [source_samples(datas[i], split, ranges[i], n, seq_length, seed, cache, backend)
               for i, n in zip(keep, sizes)]
    if len(sources) == 1:
        return BlendedSamples(sources, num_samples)
    key = {"version": INDEX_VERSION, "weights": norm, "num_samples": num_samples,
           "sources": [file_identity(datas[i].prefix) for i in keep], "split": SPLITS[split],
           "documents": [ranges[i] for i in keep], "seq_length": seq_length, "seed": seed}
    arrays = cache.load_or_build(f"blend-{SPLITS[split]}", key, ("which", "within"),
                                 lambda: helpers.blending_index(np.array(norm), num_samples, backend))
    return BlendedSamples(sources, num_samples, *arrays)
