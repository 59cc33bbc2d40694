"""`selfalign()`: the stages as datatrove pipelines on the executors `starcoder curate` uses.

    DIR/input/00000.jsonl         the --input records that parsed (when --input is given)
    DIR/<stage>/<shard>.jsonl     each stage's output, shard by shard
    DIR/reports/<stage>/<shard>.json, DIR/reports/<stage>.json, DIR/report.json
    DIR/settings.json             what each stage was run with (a rerun must match)
    DIR/logs/<stage>/             datatrove's logs

A stage's records are split into `run.shards` shards (seeds and select are one: they dedup
across everything) and `run.tasks` executor tasks share them, task t taking shards t, t + tasks,
...; a task loads the model once. A shard is finished when its report exists (written after its
output), so a rerun redoes only unfinished shards. A shard's samples depend only on the run's
seed, the stage and the shard's records, so a resumed run gives the same files.
"""

from __future__ import annotations

import hashlib
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datatrove.pipeline.base import PipelineStep

from starcoder.config import UserError
from starcoder.selfalign.config import GENERATION_STAGES, STAGES, SelfAlignConfig
from starcoder.selfalign.report import (StageReport, load_report, merge_reports, read_jsonl,
                                        run_shard, write_json, write_jsonl)
from starcoder.selfalign.stages import TOO_LONG

EXECUTORS = ("local", "slurm")
# The fields each stage reads from a record.
NEEDS = {"concepts": ("seed",), "tasks": ("seed", "concepts"), "responses": ("instruction",),
         "validate": ("instruction", "response"),
         "select": ("instruction", "response", "code", "status"), "seeds": ("content",)}


@dataclass
class Job:
    output: str
    cfg: SelfAlignConfig
    stages: list[str]
    model: Optional[str] = None
    seeds: list[str] = field(default_factory=list)
    has_input: bool = False  # the first stage reads DIR/input instead of the stage before it
    backend: str = "native"
    device: str = "cpu"
    unsafe_no_sandbox: bool = False

    @property
    def dir(self) -> Path:
        return Path(self.output)

    def shards(self, stage: str) -> int:
        return 1 if stage in ("seeds", "select") else self.cfg.run.shards

    def shard_path(self, stage: str, k: int) -> Path:
        return self.dir / stage / f"{k:05d}.jsonl"

    def report_path(self, stage: str, k: int) -> Path:
        return self.dir / "reports" / stage / f"{k:05d}.json"

    def finished(self, stage: str) -> bool:
        return all(self.report_path(stage, k).is_file() for k in range(self.shards(stage)))


def stage_input(job: Job, stage: str) -> list[dict]:
    if job.has_input and stage == job.stages[0]:
        return read_jsonl(job.dir / "input" / "00000.jsonl")
    if stage == "seeds":
        from starcoder.selfalign.seeds import read_sources
        return read_sources(job.seeds)
    before = STAGES[STAGES.index(stage) - 1]
    return [r for k in range(job.shards(before)) for r in read_jsonl(job.shard_path(before, k))]


def split(stage: str, records: list[dict], shards: int) -> list[list[dict]]:
    """Contiguous shards; validation's by instruction, so that the pass rate of an instruction's
    samples is counted in one shard."""
    if stage == "validate":
        parts: list[list[dict]] = [[] for _ in range(shards)]
        for r in records:
            parts[stable_hash(r["instruction"].strip()) % shards].append(r)
        return parts
    n = len(records)
    return [records[k * n // shards:(k + 1) * n // shards] for k in range(shards)]


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def shard_seed(seed: int, stage: str, k: int) -> int:
    return stable_hash(f"{seed}/{stage}/{k}") % 2**31


def stage_function(job: Job, stage: str, rank: int, resources: ExitStack):
    """records, seed -> (records, report) for one shard; loads the model or starts the sandbox
    once (its workers are stopped when `resources` closes)."""
    from starcoder.selfalign import stages

    cfg = job.cfg
    backend = None
    if stage in GENERATION_STAGES or (stage == "seeds" and cfg.seeds.judge):
        backend = load_backend(job, rank)
    if stage == "seeds":  # seeded by run.seed: one shard
        return lambda sources, seed: seeds_stage(sources, cfg, backend)
    if stage in GENERATION_STAGES:
        run = getattr(stages, stage)
        return lambda records, seed: run(records, backend, getattr(cfg, stage), seed)
    if stage == "validate":
        from starcoder.eval.sandbox import Sandbox
        from starcoder.selfalign.validate import validate
        sandbox = resources.enter_context(Sandbox(unsafe_no_sandbox=job.unsafe_no_sandbox))
        v = cfg.validate
        return lambda records, seed: validate(records, sandbox, v.timeout, v.workers or None)
    from starcoder.selfalign.select import select
    s = cfg.select
    return lambda records, seed: select(records, cfg.run.seed, s.threshold, s.num_perm, s.ngram)


def load_backend(job: Job, rank: int):
    from starcoder.selfalign.backends import load_backend as load
    g = job.cfg.generation
    return load(job.backend, job.model, task_device(job.device, rank), g.dtype, g.batch_size,
                g.tensor_parallel, job.dir / "hf-export")


def task_device(device: str, rank: int) -> str:
    """A local task's accelerator: "cuda" with several visible spreads the tasks over them."""
    import torch
    d = torch.device(device)
    if d.type == "cpu" or d.index is not None or not hasattr(torch, "accelerator"):
        return device
    count = torch.accelerator.device_count()
    return f"{d.type}:{rank % count}" if count > 1 else device


def seeds_stage(sources: list[dict], cfg: SelfAlignConfig, backend):
    """Extraction and filter rules, decontamination, near-dedup; then at most `max_seeds` (a
    sample seeded by run.seed, in input order) and the judge when a backend is given."""
    import random

    from starcoder.selfalign.seeds import seeds
    from starcoder.selfalign.stages import judge

    s = cfg.seeds
    kept, report = seeds(sources, threshold=s.near_dedup_threshold, max_lines=s.max_lines)
    if s.max_seeds and len(kept) > s.max_seeds:
        chosen = sorted(random.Random(cfg.run.seed).sample(range(len(kept)), s.max_seeds))
        report.drop("over seeds.max_seeds", len(kept) - s.max_seeds)
        kept = [kept[i] for i in chosen]
    if backend is not None:
        kept, verdicts = judge(kept, backend, s)
        for reason, n in verdicts.drops.items():
            report.drop(f"judge: {reason}", n)
        report.extra["judge"] = verdicts.extra
    report.records_out = len(kept)
    report.check()
    return kept, report


def run_stage_task(job: Job, stage: str, rank: int, world_size: int) -> None:
    from loguru import logger

    mine = [k for k in range(rank, job.shards(stage), world_size)
            if not job.report_path(stage, k).is_file()]
    if not mine:
        return
    records = stage_input(job, stage)
    shards = split(stage, records, job.shards(stage))
    with ExitStack() as resources:
        run = stage_function(job, stage, rank, resources)
        for k in mine:
            report = run_shard(lambda r, k=k: run(r, shard_seed(job.cfg.run.seed, stage, k)),
                               lambda k=k: shards[k], job.shard_path(stage, k), job.report_path(stage, k))
            logger.info(f"selfalign {stage} shard {k + 1}/{job.shards(stage)}: "
                        f"{report.records_in} in, {report.records_out} out{throughput(report)}")
            if report.drops.get(TOO_LONG):
                x = report.extra
                logger.warning(f"selfalign {stage}: {report.drops[TOO_LONG]} samples dropped, their "
                               f"prompt did not fit (prefix {x['prompt_file']} {x['prompt_prefix_tokens']} "
                               f"tokens, longest prompt {x['longest_prompt_tokens']}, context "
                               f"{x['context']}, {stage}.max_new_tokens {getattr(job.cfg, stage).max_new_tokens})")


def throughput(report: StageReport) -> str:
    x = report.extra
    if "tokens_per_second" in x:
        return f", {x['generated_tokens']} tokens in {x['generation_seconds']:.1f} s ({x['tokens_per_second']} tokens/s)"
    if "validations_per_second" in x:
        return f", {x['validations']} programs in {x['validation_seconds']:.1f} s ({x['validations_per_second']}/s)"
    return ""


class StageStep(PipelineStep):
    type = "🤖 selfalign"

    def __init__(self, job: Job, stage: str):
        super().__init__()
        self.job, self.stage, self.name = job, stage, stage

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        run_stage_task(self.job, self.stage, rank, world_size)


class ReportStep(PipelineStep):
    type = "📋 selfalign"
    name = "report"

    def __init__(self, job: Job):
        super().__init__()
        self.job = job

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        write_report(self.job)


def write_report(job: Job) -> dict:
    """Each stage's shard reports merged into `reports/<stage>.json`, and all of them, in
    pipeline order, into `report.json`."""
    stages = []
    order = ["input"] + list(STAGES)
    for stage in order:
        if stage == "input":
            path = job.dir / "reports" / "input.json"
            if path.is_file():
                stages.append(load_report(path).to_dict())
            continue
        if not job.finished(stage):
            continue
        merged = merge_reports([load_report(job.report_path(stage, k)) for k in range(job.shards(stage))])
        write_json(job.dir / "reports" / f"{stage}.json", merged.to_dict())
        stages.append(merged.to_dict())
    report = {"stages": stages}
    if job.finished("select"):
        report["output"] = str(job.shard_path("select", 0))
    write_json(job.dir / "report.json", report)
    return report


def prepare_input(job: Job, path: str) -> StageReport:
    """The --input file's records that parse and have the first stage's fields, copied into
    DIR/input; the others counted by reason (one line says how many and where the first is)."""
    import json

    stage, needs = job.stages[0], NEEDS[job.stages[0]]
    report = StageReport("input")
    kept, first_bad = [], None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--input {path}: not UTF-8 text (expected JSON lines)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report.records_in += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            reason = "not JSON"
        else:
            missing = [k for k in needs if not isinstance(record, dict) or not isinstance(record.get(k), str)]
            reason = f"no text field `{missing[0]}`" if missing else None
        if reason is None:
            kept.append(record)
        else:
            report.drop(reason)
            first_bad = first_bad or f"line {n}: {reason}"
    if not kept:
        raise UserError(f"--input {path}: no usable record for the {stage} stage (each line is a "
                        f"JSON object with the text fields {', '.join(needs)})"
                        + (f"; {first_bad}" if first_bad else ""))
    if first_bad:
        print(f"warning: --input {path}: {report.records_in - len(kept)} malformed records "
              f"skipped (first: {first_bad})", file=sys.stderr)
    report.records_out = len(kept)
    report.check()
    write_jsonl(job.dir / "input" / "00000.jsonl", kept)
    write_json(job.dir / "reports" / "input.json", report.to_dict())
    return report


def settings(job: Job, stage: str, input_digest: Optional[str]) -> dict:
    """What a stage's output depends on; a rerun into the same folder must match it."""
    cfg = job.cfg.to_dict()
    out = {"seed": cfg["run"]["seed"], "shards": job.shards(stage),
           "section": cfg[stage] if stage in cfg else None}
    if stage in GENERATION_STAGES or (stage == "seeds" and job.cfg.seeds.judge):
        out.update(model=job.model, backend=job.backend, generation=cfg["generation"])
    if stage == "seeds" and input_digest is None:
        out["seeds"] = job.seeds
    if stage == job.stages[0]:
        out["input"] = input_digest
    return out


def check_settings(job: Job, input_digest: Optional[str]) -> None:
    """Refuse to resume a folder whose stages were made with other settings (mixing them would
    give a dataset from two runs); record this run's."""
    import json

    path = job.dir / "settings.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    for stage in job.stages:
        now = settings(job, stage, input_digest)
        before = recorded.get(stage)
        started = (job.dir / stage).exists() or (job.dir / "reports" / stage).exists()
        if before is not None and started and before != now:
            key = next(k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
            raise UserError(f"{job.dir}: its {stage} stage was run with other settings ({key}: "
                            f"{_short(before.get(key))} then, {_short(now.get(key))} now); use a "
                            f"new --output, or remove {job.dir / stage} and the stages after it")
        recorded[stage] = now
    write_json(path, recorded)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_inputs(job: Job) -> None:
    """Each stage whose input is neither --input nor a stage of this run must find the earlier
    stage's finished output in DIR."""
    for i, stage in enumerate(job.stages):
        if stage == "seeds" or (i == 0 and job.has_input):
            continue
        before = STAGES[STAGES.index(stage) - 1]
        if before not in job.stages and not job.finished(before):
            raise UserError(f"--stages {stage}: reads the {before} stage's output, which "
                            f"{job.dir / before} does not hold finished; run {before} first or "
                            f"pass --input FILE.jsonl")


def selfalign(job: Job, executor: str = "local", input_path: Optional[str] = None) -> Optional[dict]:
    """Runs (local) or submits (slurm) the stages; returns the report when it ran here."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: expected one of {' | '.join(EXECUTORS)}")
    digest = None
    if input_path is not None:
        job.has_input = True
        digest = hashlib.sha256(Path(input_path).read_bytes()).hexdigest()
    check_inputs(job)  # before anything is written
    job.dir.mkdir(parents=True, exist_ok=True)
    check_settings(job, digest)
    if input_path is not None and not (job.dir / "reports" / "input.json").is_file():
        prepare_input(job, input_path)
    previous = None
    for stage in job.stages:
        tasks = 1 if job.shards(stage) == 1 else job.cfg.run.tasks
        previous = executor_for(executor, job, stage, [StageStep(job, stage)], tasks, previous)
    previous = executor_for(executor, job, "report", [ReportStep(job)], 1, previous)
    if executor == "slurm":
        from starcoder.curation.pipeline import submit
        submit(previous)
        return None
    previous.run()
    return write_report(job)


def executor_for(kind: str, job: Job, name: str, pipeline: list, tasks: int, depends):
    r, logs = job.cfg.run, str(job.dir / "logs" / name)
    # Our shard files say what is done; datatrove's completion marks would skip a task whose
    # shards were removed to be redone.
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(r.workers, tasks),
                                     logging_dir=logs, depends=depends, skip_completed=False)
    from starcoder.curation.pipeline import slurm_executor
    gpus = r.slurm_gpus_per_task if name in GENERATION_STAGES else 0
    return slurm_executor(pipeline, tasks, r, f"selfalign-{name}", logs, depends, gpus, skip_completed=False)
