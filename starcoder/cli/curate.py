"""`starcoder curate`: The Stack's curation pipeline (dedup, filters, PII, decontamination)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curate" / "default.yaml"

EPILOG = """\
stages (each switchable in the config): opt-out and licences, SantaCoder/StarCoder filters,
decontamination (HumanEval + your benchmark JSONL), exact dedup, near dedup (MinHash LSH, 5-gram
code shingles, 25 bands x 10 rows, J ~0.7, per language), survivor by rank (permissive licence,
stars, forks, newest), PII redaction. Output: DIR/data/*.parquet (read by `starcoder preprocess
--input DIR/data`), DIR/report.json and DIR/distributions.png. Work files go to DIR.work.

Without --input, curates the embedded default: the Python standard library with planted
duplicates, secrets and HumanEval solutions (about a minute).

examples:
  starcoder curate
  starcoder curate --input data/the-stack-python/ --output data/curated --workers 8 --tasks 64
  starcoder curate --input /shared/stack --output /shared/curated --executor slurm \\
      --set run.slurm_partition=cpu --tasks 1000
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="JSON lines / Parquet files or folders in The Stack's columns "
                             "(default: the embedded stdlib corpus)")
    parser.add_argument("--output", default="runs/curate-default", metavar="DIR",
                        help="output folder, must not exist (default: runs/curate-default)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"curation config YAML (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    parser.add_argument("--executor", default="local", choices=("local", "slurm", "ray"),
                        help="datatrove executor (default: local)")
    parser.add_argument("--workers", type=int, metavar="N", help="parallel tasks (run.workers)")
    parser.add_argument("--tasks", type=int, metavar="N", help="tasks per stage (run.tasks)")
    parser.add_argument("--logging-dir", metavar="DIR", help="work and log folder (default: OUTPUT.work)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the work folder, skipping its completed tasks")


def run(args) -> int:
    from starcoder.curation.config import load_curate_config
    from starcoder.curation.pipeline import curate
    from starcoder.curation.report import format_table

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"run.workers={args.workers}")
    if args.tasks is not None:
        overrides.append(f"run.tasks={args.tasks}")
    cfg = load_curate_config(args.config or DEFAULT_CONFIG, overrides)
    inputs = args.input
    if not inputs:
        from starcoder.curation.stdlib_corpus import build
        work = Path(args.logging_dir or f"{Path(args.output).resolve()}.work")
        build(work / "default-input")
        inputs = [str(work / "default-input")]
    report = curate(inputs, args.output, cfg, executor=args.executor,
                    logging_dir=args.logging_dir, resume=args.resume)
    if report is None:
        print(f"submitted; {args.output}/report.json appears when the last job ends")
        return 0
    print(format_table(report))
    print(f"\nwrote {args.output}/data/*.parquet, report.json, distributions.png")
    return 0
