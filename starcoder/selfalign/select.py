"""Selection (SelfCodeAlign's `sanitize_data.py`): passing samples only, shuffled with a seed,
exact dedup on the whitespace-stripped instruction and then response (so one random passing
response per instruction survives), then MinHash near-dedup (5-grams, 250 permutations,
threshold 0.7) on the instruction, then the response, then the code. Out: `instruction` and
`response`, what `starcoder preprocess --format instruct` reads."""

from __future__ import annotations

import random

from starcoder.selfalign.near_dedup import near_duplicates
from starcoder.selfalign.report import StageReport

NEAR_DEDUP_FIELDS = ("instruction", "response", "code")


def select(records: list[dict], seed: int = 0, threshold: float = 0.7, num_perm: int = 250,
           ngram: int = 5) -> tuple[list[dict], StageReport]:
    """`records` are validate's output (`status`, `instruction`, `response`, `code`)."""
    report = StageReport("select", len(records))
    kept = []
    for r in records:
        if r["status"] == "pass":
            kept.append(r)
        else:
            report.drop(r["status"])
    random.Random(seed).shuffle(kept)
    for key in ("instruction", "response"):
        seen, unique = set(), []
        for r in kept:
            text = r[key].strip()
            if text in seen:
                report.drop(f"duplicate {key}")
            else:
                seen.add(text)
                unique.append(r)
        kept = unique
    for key in NEAR_DEDUP_FIELDS:
        dup = near_duplicates(kept, lambda r: r[key], threshold, num_perm, ngram)
        report.drop(f"near-duplicate {key}", sum(dup))
        kept = [r for r, d in zip(kept, dup) if not d]
    report.records_out = len(kept)
    report.check()
    return [{"instruction": r["instruction"], "response": r["response"]} for r in kept], report
