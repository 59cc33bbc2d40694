"""The per-stage report: records in and out, drops by reason, and stage-specific figures. The
counts add up: `records_in == records_out + sum(drops)` (validation drops nothing: it labels)."""

from __future__ import annotations

import json
import os
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


def run_file(stage: Callable[[list[dict]], tuple[list[dict], StageReport]], input_path: str | Path,
             output_path: str | Path) -> StageReport:
    """One shard of a stage: `input_path` JSONL -> `output_path` JSONL plus `<output>.report.json`.
    A shard whose output and report both exist is not redone (its saved report is returned)."""
    output_path = Path(output_path)
    report_path = output_path.with_name(output_path.name + ".report.json")
    if output_path.is_file() and report_path.is_file():
        saved = json.loads(report_path.read_text())
        return StageReport(saved.pop("stage"), saved.pop("records_in"), saved.pop("records_out"),
                           Counter(saved.pop("drops")), saved)
    records, report = stage(read_jsonl(input_path))
    write_jsonl(output_path, records)
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, report_path)  # last: the report marks the shard finished
    return report
