"""The curation report: per stage documents and bytes in and out, reasons and examples
(`report.json`), a printed table, and one PNG of the size and line-length distributions of the
input and the output."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from starcoder.curation.steps import LINE_BINS, SIZE_BINS

STAGES = ("read", "input", "select", "filters", "decontamination", "exact_dedup", "near_dedup",
          "pii", "output")


def merge_stage(folder: Path) -> dict:
    total: dict = {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0,
                   "reasons": Counter(), "examples": []}
    for path in sorted(folder.glob("*.json")):
        part = json.loads(path.read_text())
        for key, value in part.items():
            if key == "reasons":
                total["reasons"].update(value)
            elif key == "examples":
                total["examples"].extend(value)
            elif isinstance(value, list):  # histograms
                total[key] = (np.add(total[key], value) if key in total else np.array(value)).tolist()
            else:
                total[key] = total.get(key, 0) + value
    total["reasons"] = dict(total["reasons"].most_common())
    return total


def build_report(work: Path, examples: int) -> dict:
    stages = {}
    for name in STAGES:
        folder = work / "report" / name
        if folder.is_dir():
            stages[name] = merge_stage(folder)
            stages[name]["examples"] = stages[name]["examples"][:examples]
    clusters = work / "removals" / "stats.json"
    report = {"stages": stages}
    if clusters.exists():
        report["dedup"] = json.loads(clusters.read_text())
    return report


def format_table(report: dict) -> str:
    rows = [f"{'stage':<16}{'docs in':>10}{'docs out':>10}{'MB in':>10}{'MB out':>10}  details"]
    for name, s in report["stages"].items():
        if name == "read":
            bad = sum(s["reasons"].values())
            rows.append(f"{'read':<16}{'':>10}{s['docs_out']:>10}{'':>10}{s['bytes_out'] / 1e6:>10.2f}  "
                        f"{bad} records skipped" + (f" {s['reasons']}" if bad else ""))
            continue
        details = ", ".join(f"{k} {v}" for k, v in list(s["reasons"].items())[:4])
        rows.append(f"{name:<16}{s['docs_in']:>10}{s['docs_out']:>10}{s['bytes_in'] / 1e6:>10.2f}"
                    f"{s['bytes_out'] / 1e6:>10.2f}  {details}")
    return "\n".join(rows)


def plot_distributions(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, style in (("input", "-"), ("output", "--")):
        s = report["stages"].get(name)
        if not s or "size_hist" not in s:
            continue
        ax1.stairs(s["size_hist"], SIZE_BINS, label=f"{name} ({s['docs_out']} files)", linestyle=style)
        ax2.stairs(s["line_hist"], LINE_BINS, label=name, linestyle=style)
    ax1.set(xlabel="log10 file size (characters)", ylabel="files")
    ax2.set(xlabel="mean line length (characters, capped at 200)", ylabel="files")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
