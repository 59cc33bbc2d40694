"""`starcoder status RUN_DIR`: steps done, last checkpoint, restarts and their causes, last log lines."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (train.output_dir)")
    parser.add_argument("--lines", type=int, default=10, help="last log lines to show (default 10)")


def run(args) -> int:
    from starcoder.launch import summarize

    print(summarize(args.run_dir, args.lines))
    return 0
