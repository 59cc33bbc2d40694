"""`starcoder train`: train or resume a model, in one process or under torchrun / srun."""

from __future__ import annotations

import argparse
import logging
import os

from starcoder.cli import add_config_arguments
from starcoder.config import load_config

EPILOG = """\
examples:
  starcoder train --config tiny-sc2 --set data.paths=[runs/demo/data/stdlib]   (after starcoder demo)
  torchrun --nproc-per-node 8 -m starcoder train --config starcoder2-3b \\
      --set data.paths=[/data/stack] --set data.tokenizer=/models/starcoder2
      (/data/stack.bin/.idx made by: starcoder preprocess --output-prefix /data/stack ...)
  sbatch tools/train.sbatch   (SLURM: one task per GPU, preemption-safe)

A run writes <train.output_dir>/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/} and
resumes from checkpoints/latest when started again with the same output_dir. SIGTERM or SIGUSR1
saves a checkpoint at the next step boundary and exits 0 (see docs/training.md).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_config_arguments(parser)


def run(args) -> int:
    from starcoder.training.signals import StopRequest

    # First, before the slow imports and start-up: SIGTERM/SIGUSR1 during start-up must stop the
    # run at its first step boundary, not kill it.
    with StopRequest() as stop:
        from starcoder.training.distributed import distributed_session
        from starcoder.training.trainer import TrainingError, train

        cfg = load_config(args.config, args.overrides)
        with distributed_session(cfg):
            if int(os.environ.get("RANK", "0")) != 0:
                logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
            try:
                train(cfg, stop)
            except TrainingError as err:
                logging.getLogger("starcoder.train").error("error: %s", err)
                return 1
    return 0
