"""The training rows of gpu_check.sh stage 4: tokens/s, MFU and peak memory of runs of one preset
and batch that differ only in `train.precision`, from their metrics.jsonl files.

    python benchmarks/gpu_train_table.py LABEL PRECISION METRICS [LABEL PRECISION METRICS ...]

The first run is the baseline of the speed-up column. The first 3 logged steps (autotuning,
compilation, warm-up) are left out of the medians when later steps exist.
"""

from __future__ import annotations

import json
import statistics
import sys

WEIGHTS = {"fp32": "fp32 (cuBLAS matmuls as TF32)", "bf16": "bf16, fp32 main weights + grads",
           "fp16": "fp16, fp32 main weights + grads"}


def summarise(path: str) -> dict | None:
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return None
    rows = [r for r in rows if "tokens_per_s" in r]
    if not rows:
        return None
    steady = rows[3:] or rows
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {"steps": len(rows), "first": len(rows) - len(steady) + 1,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(mfus) if mfus else None,
            "mem": max((r.get("mem_gib") or 0) for r in rows),
            "loss": rows[-1].get("loss", float("nan"))}


def main(argv: list[str]) -> None:
    if not argv or len(argv) % 3:
        sys.exit("usage: gpu_train_table.py LABEL PRECISION METRICS [...]")
    runs = [(argv[i], argv[i + 1], summarise(argv[i + 2])) for i in range(0, len(argv), 3)]
    base = runs[0][2]
    print("| run | train.precision | weights | steps (median over) | tokens/s | vs first | MFU | "
          "peak GiB | last loss |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for label, precision, s in runs:
        if s is None:
            print(f"| {label} | {precision} | {WEIGHTS.get(precision, precision)} | no metrics "
                  f"(see check.log) | | | | | |")
            continue
        ratio = f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "n/a"
        print(f"| {label} | {precision} | {WEIGHTS.get(precision, precision)} | {s['steps']} "
              f"({s['first']}-{s['steps']}) | {s['tokens_per_s']:,.0f} | {ratio} | {mfu} | "
              f"{s['mem']:.1f} | {s['loss']:.3f} |")
    print("\n- One process, so data parallel is 1: the distributed optimizer has no slice to shard "
          "(each bucket is owned whole), and its savings (0.75x the data-parallel bytes of an fp32 "
          "all-reduce, 6 + 12/DP bytes per parameter) cannot show here; the after row measures bf16 "
          "weights with fp32 main weights and fp32 gradient accumulation only. MFU counts both "
          "runs against the card's bf16 dense peak.")


if __name__ == "__main__":
    main(sys.argv[1:])
