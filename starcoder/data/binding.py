"""Data is bound to the tokenizer that made it.

`starcoder preprocess` records in PREFIX.json the tokenizer's vocabulary fingerprint, its size
and the largest id written. Before training reads a source, `check_tokenizer` compares them with
`data.tokenizer`: another vocabulary is an error naming both tokenizers, and an id at or above the
vocabulary is an error naming the file. Data without that record (made by Megatron's preprocess,
or by an older version) has its largest id found by one pass over the `.bin`, remembered in the
index cache beside the indices, keyed like them on the file's size and mtime.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from starcoder.config import UserError
from starcoder.data.indexed import IndexedTokens
from starcoder.data.tokenizer import Tokenizer

SCAN_BLOCK = 1 << 26  # tokens per pass of the largest-id scan (128 MiB of uint16)
log = logging.getLogger(__name__)


def recorded(prefix: str) -> dict:
    """PREFIX.json, the preprocess report; {} when there is none or it is unreadable."""
    try:
        with open(f"{prefix}.json") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def check_tokenizer(prefixes: list[str], tokenizer: Tokenizer, cache_folder: Optional[Path]) -> None:
    """Raise a UserError unless every source was made with `tokenizer`'s vocabulary and holds
    only ids below its size."""
    for prefix in prefixes:
        report = recorded(prefix)
        theirs = report.get("tokenizer_fingerprint")
        if theirs and (theirs != tokenizer.fingerprint or report.get("vocab_size") != tokenizer.vocab_size):
            raise UserError(
                f"{prefix} was tokenised with {report.get('tokenizer')} (vocabulary "
                f"{report.get('vocab_size')}, fingerprint {theirs[:12]}), but data.tokenizer is "
                f"{tokenizer.name} (vocabulary {tokenizer.vocab_size}, fingerprint "
                f"{tokenizer.fingerprint[:12]}); preprocess the data with data.tokenizer or train "
                "with the tokenizer that made it")
        largest = report.get("max_token_id") if theirs else None
        if largest is None:
            largest = largest_id(prefix, cache_folder)
        if largest >= tokenizer.vocab_size:
            raise UserError(f"{prefix}.bin: token id {largest} is at or above the vocabulary of "
                            f"data.tokenizer {tokenizer.name} ({tokenizer.vocab_size}); the data was "
                            "made with a larger tokenizer")


def largest_id(prefix: str, cache_folder: Optional[Path]) -> int:
    """The largest token id in PREFIX.bin (-1 when empty), scanned once and cached."""
    data = IndexedTokens(prefix)
    stat = os.stat(f"{prefix}.bin")
    memo = None
    if cache_folder is not None:
        memo = Path(cache_folder) / f"{Path(prefix).name}-{stat.st_size}-{stat.st_mtime_ns}-max_token_id.json"
        try:
            return int(json.loads(memo.read_text())["max_token_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    log.info("%s.bin has no preprocess record (PREFIX.json): scanning it for its largest token id", prefix)
    tokens, largest = data.tokens, -1
    for lo in range(0, len(tokens), SCAN_BLOCK):
        largest = max(largest, int(np.max(tokens[lo:lo + SCAN_BLOCK])))
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"prefix": os.path.abspath(prefix), "max_token_id": largest}))
            os.replace(tmp, memo)
        except OSError:  # a read-only cache costs a rescan next time, nothing more
            pass
    return largest
