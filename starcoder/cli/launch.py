"""`starcoder launch`: check a SLURM launch, write its sbatch script into the run folder, submit it."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from starcoder.cli import add_config_arguments
from starcoder.config import UserError, load_config

EPILOG = """\
examples:
  starcoder launch --config starcoder-15b --nodes 64 --set parallel.pipeline_parallel=4 \\
      --set data.paths=[/data/stack] --set data.tokenizer=/models/starcoder \\
      --set train.output_dir=/ckpt/sc-15b --time 48:00:00 --partition gpu --dry-run
  starcoder launch --config tiny-sc2 --nodes 1 --cpu-tasks-per-node 2 --set data.paths=[data/x]

The script is RUN/launch.sbatch (RUN = train.output_dir); its path is the last line printed.
--dry-run checks and writes it without submitting: `sbatch RUN/launch.sbatch` submits it later.
Follow a run with `starcoder status RUN`. Templates per preset: tools/slurm/; docs/slurm.md.
"""

SCRIPT_NAME = "launch.sbatch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_config_arguments(parser)
    parser.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    tasks = parser.add_mutually_exclusive_group()
    tasks.add_argument("--gpus-per-node", type=int, default=8,
                       help="GPU nodes: one rank per GPU (default 8)")
    tasks.add_argument("--cpu-tasks-per-node", type=int, metavar="N",
                       help="CPU nodes: N ranks per node (gloo)")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (SLURM's default if unset)")
    parser.add_argument("--time", default="24:00:00", metavar="HH:MM:SS", help="time limit (default 24:00:00)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--job-name", default="starcoder", help="SLURM job name (default starcoder)")
    parser.add_argument("--signal-lead", type=int, default=600, metavar="SECONDS",
                        help="USR1 this long before the time limit: above one step + one save + "
                             "a minute (default 600)")
    parser.add_argument("--max-restarts", type=int, default=3, metavar="K",
                        help="requeues after failures (dead rank, hung collective); time-limit "
                             "requeues do not count (default 3)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80, metavar="GIB",
                        help="memory of one GPU, for the dry run's estimate (default 80)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything and write the script, but do not submit it")


def run(args) -> int:
    from starcoder.launch import SlurmJob, check_launch, render
    from starcoder.launch.checks import memory_check, schedule_problems

    for name in ("nodes", "gpus_per_node", "cpu_tasks_per_node", "cpus_per_task", "signal_lead"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {value}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts: must be at least 0, got {args.max_restarts}")
    cfg = load_config(args.config, args.overrides)
    tasks = args.cpu_tasks_per_node or args.gpus_per_node
    layout, problems = check_launch(cfg, args.nodes, tasks)
    problems += schedule_problems(args.time, args.signal_lead)
    print(layout.describe())
    if layout.accumulation is not None:
        plan, too_big = memory_check(cfg, layout, int(args.gpu_memory_gib * 2**30))
        print(f"memory per {'rank' if args.cpu_tasks_per_node else 'GPU'} (starcoder plan): "
              f"{plan.total / 2**30:.1f} GiB of {args.gpu_memory_gib:g} GiB, largest term "
              f"{plan.dominant}")
        problems += [] if args.cpu_tasks_per_node else too_big  # CPU memory is not GPU memory
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2

    run_dir = Path(cfg.train.output_dir).absolute()
    job = SlurmJob(run_dir=str(run_dir), config=args.config, overrides=args.overrides,
                   nodes=args.nodes, gpus_per_node=None if args.cpu_tasks_per_node else args.gpus_per_node,
                   cpu_tasks_per_node=args.cpu_tasks_per_node, cpus_per_task=args.cpus_per_task,
                   time=args.time, partition=args.partition, account=args.account,
                   signal_lead=args.signal_lead, max_restarts=args.max_restarts,
                   job_name=args.job_name, python=sys.executable, workdir=os.getcwd())
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / SCRIPT_NAME
    tmp = script.with_suffix(".tmp")
    tmp.write_text(render(job))
    os.replace(tmp, script)  # never a half-written script
    if not args.dry_run:
        if shutil.which("sbatch") is None:
            raise UserError("sbatch: not found on this machine; use --dry-run and submit the script "
                            "where SLURM is")
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
        if done.returncode:
            raise UserError(f"sbatch: {' '.join(done.stderr.split())}")
        print(f"submitted job {done.stdout.strip().split(';')[0]}")
    print(script)
    return 0
