"""Greedy MinHash LSH near-dedup of records on one text field (datasketch), as SelfCodeAlign's
`minhash_dedup.py` (text-dedup): lowercased text, tokens split on `[^A-Za-z_0-9]` (the curation
stage's `code_tokens`), word n-grams, the first record of a cluster kept.

The curation stage's MinHash runs as datatrove pipeline steps over sharded folders; these stages
dedup a list in memory, so datasketch does it here."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from datasketch import MinHash, MinHashLSH

from starcoder.curation.dedup import code_tokens


def shingles(text: str, ngram: int) -> set[bytes]:
    tokens = code_tokens(text.lower())
    if len(tokens) < ngram:  # a short text is one shingle, not none (never a silent match)
        return {" ".join(tokens).encode()}
    return {" ".join(tokens[i:i + ngram]).encode() for i in range(len(tokens) - ngram + 1)}


@lru_cache(maxsize=None)
def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's (bands, rows) for the threshold; found by numerical integration, which costs
    more than deduplicating a small shard, so once per setting."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def near_duplicates(records: list[dict], text: Callable[[dict], str], threshold: float,
                    num_perm: int, ngram: int, seed: int = 1) -> list[bool]:
    """For each record, whether an earlier kept record is a near duplicate (estimated Jaccard of
    the shingle sets at or above `threshold`, through LSH candidates)."""
    lsh = MinHashLSH(num_perm=num_perm, params=_bands(threshold, num_perm))
    duplicate = []
    for i, record in enumerate(records):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(list(shingles(text(record), ngram)))
        hit = bool(lsh.query(m))
        duplicate.append(hit)
        if not hit:
            lsh.insert(str(i), m)
    return duplicate
