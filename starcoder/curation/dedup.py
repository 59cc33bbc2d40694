"""Exact and near deduplication with a ranked survivor.

Near dedup is datatrove's MinHash LSH (signatures -> buckets) with two changes the issue found
necessary for code:
- shingles are bigcode's: tokens split on `[^A-Za-z_0-9]`, 5-grams, no lowercasing or spaCy
  (datatrove's default normalisation cost recall and 3-5x the time on code);
- the cluster step is ours: datatrove keeps an arbitrary member (the union-by-size root), we keep
  the best by Stack v2's rank (permissive licence, stars, forks, newest) and cluster only within a
  language.

Exact dedup groups documents by a content hash in the same single-task step, so both stages share
one survivor rule. A document is addressed as (task, index in task), datatrove's convention.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from datetime import datetime
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from starcoder.curation.config import NearDedupConfig

MERSENNE = np.uint64((1 << 61) - 1)
NON_ALNUM = re.compile(r"[^A-Za-z_0-9]")
ALNUM_BYTES = re.compile(rb"[A-Za-z_0-9]+")

# The Stack column names (v1, then v2) of what the survivor rank reads.
LICENSE_KEYS = ("max_stars_repo_licenses", "licenses", "detected_licenses", "license")
LICENSE_TYPE_KEYS = ("license_type",)  # v2: permissive | no_license | non_permissive
STARS_KEYS = ("max_stars_count", "star_events_count", "stars")
FORKS_KEYS = ("max_forks_count", "fork_events_count", "forks")
DATE_KEYS = ("revision_date", "max_stars_repo_stars_event_max_datetime", "committer_date", "visit_date")
LANGUAGE_KEYS = ("lang", "language")


def code_tokens(text: str) -> list[str]:
    return [t for t in NON_ALNUM.split(text) if t]


def minhash_config(cfg: NearDedupConfig) -> MinhashConfig:
    return MinhashConfig(n_grams=cfg.ngram_size, num_buckets=cfg.num_buckets,
                         hashes_per_bucket=cfg.hashes_per_bucket, seed=cfg.seed,
                         hash_config=HashConfig(precision=32, hash_fc="sha1"))


def candidate_probability(j, bands: int, rows: int):
    """The LSH curve: P(a pair of Jaccard j shares at least one band)."""
    return 1.0 - (1.0 - np.asarray(j, dtype=float) ** rows) ** bands


class _CodeTokenizer(WordTokenizer):
    """Handed to datatrove as `language=` so its constructor does not import spaCy; unused
    otherwise (get_shingles below does the tokenising)."""

    def word_tokenize(self, text: str) -> list[str]:
        return code_tokens(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class CodeMinhashSignature(MinhashDedupSignature):
    """datatrove's signature stage with bigcode's code shingling and minimum token count."""

    name = "🎯 MinHash signatures (code shingles)"

    def __init__(self, output_folder: str, cfg: NearDedupConfig):
        super().__init__(output_folder, config=minhash_config(cfg), language=_CodeTokenizer())
        self.min_tokens = cfg.min_tokens

    def get_shingles(self, text: str) -> np.ndarray:
        # On UTF-8 bytes: the same tokens as on text (non-ASCII characters separate either way),
        # without encoding every 5-gram again for sha1.
        tokens = ALNUM_BYTES.findall(text.encode("utf-8", "surrogatepass"))
        n = self.config.n_grams
        if len(tokens) < self.min_tokens:
            return np.empty((0, 1), dtype=np.uint64)  # datatrove writes no signature: never a dup
        grams = {b" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}
        # datatrove's sha1_hash32 (the first 4 digest bytes, little-endian), decoded in one call.
        sha1 = hashlib.sha1
        digests = b"".join([sha1(g).digest()[:4] for g in grams])
        return np.frombuffer(digests, dtype="<u4").astype(np.uint64).reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """datatrove's values, (a*h + b) mod (2^61 - 1) on wrapping uint64, in blocks of 256
        shingles: its one (shingles x 250) temporary fell out of cache and cost 10x."""
        a, b = self.parameters
        mins = np.full(self.num_hashes, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), 256):
            x = (shingles[start:start + 256] * a + b) % MERSENNE
            if self.config.hash_config.precision == 32:
                x &= np.uint64(self.config.hash_config.max)
            np.minimum(mins, x.min(axis=0), out=mins)
        mins = mins.astype(self.config.hash_config.np_dtype)
        return [x.tolist() for x in np.split(mins, self.config.num_buckets)]


# ---------------------------------------------------------------------------------------------
# Survivor rank


def _first(meta: dict, keys: Iterable[str]):
    for key in keys:
        value = meta.get(key)
        if value is not None:
            return value
    return None


def license_class(meta: dict, permissive: set[str]) -> int:
    """2 permissive, 1 no licence, 0 non-permissive (Stack v2's order)."""
    kind = _first(meta, LICENSE_TYPE_KEYS)
    if isinstance(kind, str):
        return {"permissive": 2, "no_license": 1}.get(kind, 0)
    found = licenses_of(meta)
    if not found:
        return 1
    return 2 if any(lic in permissive for lic in found) else 0


def licenses_of(meta: dict) -> list[str]:
    value = _first(meta, LICENSE_KEYS)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _number(value) -> float:
    try:
        return float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def _timestamp(value) -> float:
    if value is None:
        return 0.0
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def rank_key(meta: dict, permissive: set[str]) -> tuple[float, float, float, float]:
    """Larger is better: licence class, stars, forks, newest date."""
    return (float(license_class(meta, permissive)), _number(_first(meta, STARS_KEYS)),
            _number(_first(meta, FORKS_KEYS)), _timestamp(_first(meta, DATE_KEYS)))


def language_of(meta: dict) -> str:
    value = _first(meta, LANGUAGE_KEYS)
    return str(value).lower() if value is not None else ""


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class DedupKeys(PipelineStep):
    """Records, per document of this task, what the cluster step needs (id, language, content
    hash, rank), in input order, so (task, index) addresses the same document in every stage."""

    type = "🫂 - DEDUP"
    name = "🔑 dedup keys"

    def __init__(self, output_folder: str, permissive: list[str], rank: bool, per_language: bool):
        super().__init__()
        self.output_folder = str(output_folder)
        self.permissive, self.rank, self.per_language = list(permissive), rank, per_language

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        permissive = set(self.permissive)
        rows = []
        for doc in data:
            rows.append([doc.id, language_of(doc.metadata) if self.per_language else "",
                         content_hash(doc.text),
                         list(rank_key(doc.metadata, permissive)) if self.rank else [0, 0, 0, 0]])
            yield doc
        out = Path(self.output_folder) / f"{rank:05d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(out)


def read_keys(folder: str | Path) -> dict[tuple[int, int], list]:
    keys = {}
    for path in sorted(Path(folder).glob("*.json")):
        task = int(path.stem)
        for idx, row in enumerate(json.loads(path.read_text())):
            keys[(task, idx)] = row
    return keys


def read_pairs(dups_folder: str | Path) -> Iterable[tuple[tuple[int, int], tuple[int, int]]]:
    """Candidate pairs from datatrove's bucket stage ((task, index), (task, index))."""
    for path in sorted(Path(dups_folder).glob("*.dups")):
        data = path.read_bytes()
        for f1, d1, f2, d2 in struct.iter_unpack("<4I", data):
            yield (f1, d1), (f2, d2)


def _best(members: list, keys: dict) -> tuple[int, int]:
    """The survivor: the highest rank, then the earliest document."""
    return min(members, key=lambda m: ([-x for x in keys[m][3]], m))


def cluster(keys: dict, pairs: Optional[Iterable], exact: bool
            ) -> tuple[dict[tuple[int, int], tuple[str, tuple[int, int]]], dict]:
    """Documents to remove -> (stage, survivor). Exact duplicates first (same language and
    hash), then connected components of the candidate pairs among the rest."""
    removed: dict[tuple[int, int], tuple[str, tuple[int, int]]] = {}
    stats = {"exact_groups": 0, "candidate_pairs": 0, "near_clusters": 0}
    if exact:
        groups: dict[tuple[str, str], list] = {}
        for node, (_, lang, digest, _) in keys.items():
            groups.setdefault((lang, digest), []).append(node)
        for members in groups.values():
            if len(members) > 1:
                stats["exact_groups"] += 1
                keep = _best(members, keys)
                removed.update({m: ("exact_dedup", keep) for m in members if m != keep})
    if pairs is None:
        return removed, stats
    parent: dict = {}

    def find(x):
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        stats["candidate_pairs"] += 1
        if a in removed or b in removed or a not in keys or b not in keys:
            continue  # an exact copy's pairs are its survivor's pairs
        if keys[a][1] != keys[b][1]:
            continue  # another language
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    components: dict = {}
    for node in list(parent):
        components.setdefault(find(node), []).append(node)
    for members in components.values():
        if len(members) > 1:
            stats["near_clusters"] += 1
            keep = _best(members, keys)
            removed.update({m: ("near_dedup", keep) for m in members if m != keep})
    return removed, stats


class RankedClusters(PipelineStep):
    """One task: reads every task's keys and the bucket stage's pairs, writes per task the
    indices to drop (`{task:05d}.json`: index -> [stage, survivor id])."""

    type = "🫂 - DEDUP"
    name = "🏆 ranked clusters"

    def __init__(self, keys_folder: str, dups_folder: Optional[str], output_folder: str, exact: bool):
        super().__init__()
        self.keys_folder, self.dups_folder = str(keys_folder), dups_folder and str(dups_folder)
        self.output_folder, self.exact = str(output_folder), exact

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        assert world_size == 1, "clustering is one task"
        keys = read_keys(self.keys_folder)
        pairs = read_pairs(self.dups_folder) if self.dups_folder else None
        removed, stats = cluster(keys, pairs, self.exact)
        per_task: dict[int, dict] = {}
        for (task, idx), (stage, keep) in removed.items():
            per_task.setdefault(task, {})[idx] = [stage, keys[keep][0]]
        out = Path(self.output_folder)
        out.mkdir(parents=True, exist_ok=True)
        for task in {t for t, _ in keys} | set(per_task):
            (out / f"{task:05d}.json").write_text(json.dumps(per_task.get(task, {})))
        (out / "stats.json").write_text(json.dumps(stats))
        self.stat_update("removed", value=len(removed))
