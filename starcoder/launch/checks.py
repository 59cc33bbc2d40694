"""What a dry run checks before anything runs: the layout's arithmetic (world size against
tensor x pipeline parallel, the global batch against micro-batch x data parallel), that the data
and the tokenizer exist, and that the run folder can be written. Every problem is one line that
starts with the key to change."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from starcoder.config import Config
from starcoder.planning import Plan, plan_layout


@dataclass
class Layout:
    nodes: int
    tasks_per_node: int
    world_size: int
    tp: int
    pp: int
    dp: int | None  # None when the world size does not divide
    accumulation: int | None  # micro-batches per rank per step; None when the batch does not divide

    def describe(self) -> str:
        dp = self.dp if self.dp is not None else "?"
        accum = self.accumulation if self.accumulation is not None else "?"
        return (f"world size {self.world_size} ({self.nodes} nodes x {self.tasks_per_node} tasks) = "
                f"TP {self.tp} x PP {self.pp} x DP {dp}; {accum} micro-batch(es) per rank per step")


def check_launch(cfg: Config, nodes: int, tasks_per_node: int) -> tuple[Layout, list[str]]:
    """The layout of `nodes` x `tasks_per_node` ranks, and every problem found (empty: none)."""
    p, t = cfg.parallel, cfg.train
    world = nodes * tasks_per_node
    problems, dp, accum = [], None, None
    model_parallel = p.tensor_parallel * p.pipeline_parallel
    if world % model_parallel:
        problems.append(f"parallel.tensor_parallel: world size {world} ({nodes} nodes x "
                        f"{tasks_per_node}) is not divisible by tensor_parallel x pipeline_parallel "
                        f"({p.tensor_parallel} x {p.pipeline_parallel})")
    else:
        dp = world // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp):
            problems.append(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                            f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp})")
        else:
            accum = t.global_batch_size // (t.micro_batch_size * dp)
    problems += _data_problems(cfg) + _output_problems(t.output_dir)
    return Layout(nodes, tasks_per_node, world, p.tensor_parallel, p.pipeline_parallel, dp, accum), problems


def memory_check(cfg: Config, layout: Layout, gpu_memory: int) -> tuple[Plan, list[str]]:
    """`starcoder plan`'s per-GPU memory estimate of a layout whose arithmetic holds, and a problem
    when it exceeds `gpu_memory`."""
    plan = plan_layout(cfg, layout.nodes, layout.tasks_per_node, gpu_memory)
    if plan.fits:
        return plan, []
    return plan, [f"train.micro_batch_size: the per-GPU memory estimate {plan.total / 2**30:.1f} GiB "
                  f"exceeds {gpu_memory / 2**30:.0f} GiB (largest term: {plan.dominant}); lower it, "
                  "set model.recompute, or see `starcoder plan --nodes N` for layouts that fit"]


def _data_problems(cfg: Config) -> list[str]:
    d, problems = cfg.data, []
    if not d.paths:
        problems.append("data.paths: no training data (prefixes of .bin/.idx pairs written by "
                        "`starcoder preprocess`)")
    for i, source in enumerate(d.paths):
        missing = [ext for ext in (".bin", ".idx") if not Path(source.path + ext).is_file()]
        if missing:
            problems.append(f"data.paths[{i}]: {source.path}{'/'.join(missing)} not found")
    if d.tokenizer is None:
        problems.append("data.tokenizer: required for training (a tokenizer.json, a folder "
                        "holding one, or builtin:tiny)")
    elif not d.tokenizer.startswith("builtin:") and not Path(d.tokenizer).exists():
        problems.append(f"data.tokenizer: {d.tokenizer} not found")
    return problems


def _output_problems(output_dir: str) -> list[str]:
    """The run folder, or the nearest folder above it that exists, must be writable."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return [f"train.output_dir: {existing} is not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"train.output_dir: {existing} is not writable"]
    return []


def time_limit_seconds(limit: str) -> int | None:
    """SLURM's --time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; None if
    it is none of them."""
    days, _, rest = limit.partition("-") if "-" in limit else ("0", "", limit)
    try:
        parts = [int(x) for x in rest.split(":")]
        day_count = int(days)
    except ValueError:
        return None
    if "-" in limit:  # D-HH[:MM[:SS]]
        if len(parts) > 3:
            return None
        h, m, s = (parts + [0, 0])[:3]
    else:  # MM, MM:SS or HH:MM:SS
        if len(parts) > 3:
            return None
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((day_count * 24 + h) * 60 + m) * 60 + s


def schedule_problems(limit: str, signal_lead: int) -> list[str]:
    """The time limit must parse, and USR1 must come after the job starts."""
    seconds = time_limit_seconds(limit)
    if seconds is None:
        return [f"--time: {limit!r} is not a SLURM time (HH:MM:SS, D-HH:MM:SS or minutes)"]
    if signal_lead >= seconds:
        return [f"--signal-lead: {signal_lead} s is not below the time limit --time {limit} "
                f"({seconds} s): USR1 would stop every run at once"]
    return []
