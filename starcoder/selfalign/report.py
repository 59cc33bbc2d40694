"""The per-stage report: records in and out, drops by reason, and stage-specific figures. The
counts add up: `records_in == records_out + sum(drops)` (validation drops nothing: it labels)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable


@dataclass
class StageReport:
    stage: str
    records_in: int = 0
    records_out: int = 0
    drops: Counter = field(default_factory=Counter)
    extra: dict = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:  # reasons that dropped nothing stay out of the report
            self.drops[reason] += n

    def check(self) -> None:
        """The counts must add up; a stage that loses a record without a reason is a bug."""
        dropped = sum(self.drops.values())
        assert self.records_in == self.records_out + dropped, (
            f"{self.stage}: {self.records_in} in != {self.records_out} out + {dropped} dropped")

    def to_dict(self) -> dict:
        return {"stage": self.stage, "records_in": self.records_in, "records_out": self.records_out,
                "drops": dict(self.drops.most_common()), **self.extra}


def progress_bar(total: int, what: str):
    """A bar on a terminal; nothing in logs and tests."""
    from tqdm import tqdm
    return tqdm(total=total, desc=what, unit="sample", leave=False, disable=not sys.stderr.isatty())


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Written to a temporary name and renamed: a file that exists is complete (resume reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def write_json(path: str | Path, value) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def load_report(path: str | Path) -> StageReport:
    saved = json.loads(Path(path).read_text())
    return StageReport(saved.pop("stage"), saved.pop("records_in"), saved.pop("records_out"),
                       Counter(saved.pop("drops")), saved)


def run_shard(stage: Callable[[list[dict]], tuple[list[dict], StageReport]],
              records: Callable[[], list[dict]], output_path: str | Path,
              report_path: str | Path) -> StageReport:
    """One shard of a stage: its records (read only when needed) -> `output_path` JSONL and its
    report. A shard whose report exists is finished (the report is written last) and is not
    redone; its saved report is returned."""
    if Path(report_path).is_file() and Path(output_path).is_file():
        return load_report(report_path)
    out, report = stage(records())
    write_jsonl(output_path, out)
    write_json(report_path, report.to_dict())
    return report


# Report keys that are not summed when shards merge: kept from the first shard, the largest, or
# recomputed from the sums.
FIRST = {"samples_per_record", "prompt_file", "prompt_prefix_tokens", "context"}
LARGEST = {"longest_prompt_tokens"}
RATES = {"tokens_per_second": ("generated_tokens", "generation_seconds"),
         "validations_per_second": ("validations", "validation_seconds")}


def merge_reports(reports: list[StageReport]) -> StageReport:
    """One report for a stage's shards: counts summed, per-instruction pass rates pooled (an
    instruction's samples are all in one shard) into a histogram of passes per instruction."""
    merged = StageReport(reports[0].stage)
    per_instruction = []
    for r in reports:
        merged.records_in += r.records_in
        merged.records_out += r.records_out
        merged.drops.update(r.drops)
        for key, value in r.extra.items():
            if key == "per_instruction":
                per_instruction += value
            elif key in FIRST or key in RATES or key in ("mean_pass_rate",):
                merged.extra.setdefault(key, value)
            elif key in LARGEST:
                merged.extra[key] = max(merged.extra.get(key, value), value)
            elif isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
                merged.extra[key] = dict(Counter(merged.extra.get(key, {})) + Counter(value))
            elif isinstance(value, (int, float)):
                merged.extra[key] = round(merged.extra.get(key, 0) + value, 3)
            else:  # a nested report (the seed judge's) or text: seeds and select are one shard
                merged.extra.setdefault(key, value)
    for rate, (amount, seconds) in RATES.items():
        if seconds in merged.extra:
            spent = merged.extra[seconds]
            merged.extra[rate] = round(merged.extra[amount] / spent, 1) if spent else 0.0
    if reports[0].extra.get("per_instruction") is not None:
        rates = [p["passed"] / p["samples"] for p in per_instruction]
        merged.extra["mean_pass_rate"] = round(sum(rates) / len(rates), 4) if rates else 0.0
        histogram = Counter(f"{p['passed']}/{p['samples']}" for p in per_instruction)
        merged.extra["instructions_by_passes"] = dict(sorted(histogram.items(), key=lambda kv: (
            int(kv[0].split("/")[1]), int(kv[0].split("/")[0]))))
    merged.check()
    return merged


def format_table(report: dict) -> str:
    """report.json as a table: a line per stage, drops by reason, throughput where measured."""
    rows = [("stage", "in", "out", "dropped", "throughput")]
    for s in report["stages"]:
        drops = ", ".join(f"{reason} {n}" for reason, n in s["drops"].items()) or "-"
        speed = (f"{s['tokens_per_second']} tokens/s" if "tokens_per_second" in s
                 else f"{s['validations_per_second']} programs/s" if "validations_per_second" in s else "")
        rows.append((s["stage"], str(s["records_in"]), str(s["records_out"]), drops, speed))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    validate = next((s for s in report["stages"] if s["stage"] == "validate"), None)
    if validate is not None:
        lines.append(f"\nvalidation: {validate['statuses']}; {validate['instructions_with_a_pass']} of "
                     f"{validate['instructions']} instructions have a passing response (mean pass "
                     f"rate {validate['mean_pass_rate']:.2f}); passes per instruction: "
                     f"{validate['instructions_by_passes']}")
    return "\n".join(line.rstrip() for line in lines)
