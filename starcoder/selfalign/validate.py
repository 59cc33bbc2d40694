"""Validation: each response's code runs with its own tests in the eval sandbox (bubblewrap,
rlimits, a wall clock, parallel workers: `starcoder.eval.sandbox`). Pass means exit code 0
within the time limit. Every record comes out labelled `status`: pass, fail, timeout or
unparsable (with `reason`); nothing is dropped here, `select` does that."""

from __future__ import annotations

import time
from collections import Counter
from typing import Optional

from starcoder.config import UserError
from starcoder.eval.sandbox import Sandbox
from starcoder.selfalign.parse import parse_response, program
from starcoder.selfalign.report import StageReport, progress_bar

STATUSES = ("pass", "fail", "timeout", "unparsable")


def validate(records: list[dict], sandbox: Sandbox, timeout: float = 10.0,
             workers: Optional[int] = None) -> tuple[list[dict], StageReport]:
    """`records` hold `instruction` and `response` (the raw model output). Out: `instruction`,
    `response` (the parsed Response section), `code`, `tests`, `raw`, `status`, `reason`."""
    out, runs = [], []
    for n, record in enumerate(records, 1):
        if not all(isinstance(record.get(k), str) for k in ("instruction", "response")):
            raise UserError(f"record {n}: needs the text fields `instruction` and `response` "
                            f"(the raw model output)")
        parsed = parse_response(record["response"])
        row = {**{k: v for k, v in record.items() if k != "response"},
               "instruction": record["instruction"], "response": parsed.response,
               "code": parsed.code, "tests": parsed.tests, "raw": record["response"]}
        if parsed.error is not None:
            row.update(status="unparsable", reason=parsed.error)
        else:
            runs.append((len(out), program(parsed)))
        out.append(row)
    start = time.perf_counter()
    with progress_bar(len(runs), "validating") as bar:
        results = sandbox.run_many([p for _, p in runs], timeout=timeout, workers=workers,
                                   progress=lambda i, result: bar.update())
    seconds = time.perf_counter() - start
    for (i, _), result in zip(runs, results):
        status = "pass" if result.passed else "timeout" if result.result == "timed out" else "fail"
        out[i].update(status=status, reason=result.result)
    report = StageReport("validate", len(records), len(out))
    report.extra.update(statuses=dict(Counter(r["status"] for r in out)), validations=len(runs),
                        validation_seconds=round(seconds, 3),
                        validations_per_second=round(len(runs) / seconds, 1) if runs else 0.0,
                        **pass_rates(out))
    report.check()
    return out, report


def pass_rates(records: list[dict]) -> dict:
    """Per instruction (whitespace-stripped), samples and passes; and their summary."""
    per: dict[str, list[int]] = {}
    for r in records:
        counts = per.setdefault(r["instruction"].strip(), [0, 0])
        counts[0] += 1
        counts[1] += r["status"] == "pass"
    rates = [p / n for n, p in per.values()]
    return {"instructions": len(per),
            "instructions_with_a_pass": sum(p > 0 for _, p in per.values()),
            "mean_pass_rate": sum(rates) / len(rates) if rates else 0.0,
            "per_instruction": [{"instruction": k[:80], "samples": n, "passed": p}
                                for k, (n, p) in per.items()]}
