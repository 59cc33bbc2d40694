"""`curate()`: The Stack's curation as datatrove pipelines, chained by dependencies.

  prepare  (run.tasks)          read -> opt-out/licences -> filters -> decontamination
                                -> dedup keys -> intermediate Parquet -> MinHash signatures
  buckets  (near_dedup.num_buckets)  datatrove's LSH bucket stage: candidate pairs
  clusters (1)                  exact groups and ranked near-dup clusters -> removals per task
  finish   (run.tasks)          read task back -> drop duplicates -> PII -> output Parquet
  report   (1)                  report.json, distributions.png, output moved into place

The same stages go to datatrove's local, Slurm or Ray executor. Everything is written under the
work folder (`OUTPUT.work` unless --logging-dir); the output folder appears only when the report
step has finished, so a failed run never leaves half an output.
"""

from __future__ import annotations

import json

import shutil
import sys
from pathlib import Path
from typing import Optional

from datatrove.pipeline.base import PipelineStep

from starcoder.config import ConfigError, UserError
from starcoder.curation.config import CurateConfig
from starcoder.curation.dedup import CodeMinhashSignature, DedupKeys, RankedClusters, minhash_config
from starcoder.curation.report import build_report, plot_distributions
from starcoder.curation.steps import (Decontaminate, DropDuplicates, Measure, QualityFilters,
                                      ReadCorpus, ReadTask, RedactPII, Select, WriteParquet)

EXECUTORS = ("local", "slurm", "ray")


class Finalize(PipelineStep):
    name = "📋 report"

    def __init__(self, work: str, output: str, examples: int):
        super().__init__()
        self.work, self.output, self.examples = str(work), str(output), examples

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        work, staged = Path(self.work), Path(self.work) / "output"
        report = build_report(work, self.examples)
        (staged / "data").mkdir(parents=True, exist_ok=True)
        (staged / "report.json").write_text(json.dumps(report, indent=1))
        plot_distributions(report, staged / "distributions.png")
        staged.replace(self.output)
        for heavy in ("intermediate", "signatures"):  # the pairs (buckets/) and keys stay
            shutil.rmtree(work / heavy, ignore_errors=True)


def stages(cfg: CurateConfig, inputs: list[str], output: str, work: Path) -> list[tuple[str, list, int]]:
    w, key = str(work), cfg.input.content_key
    near, exact = cfg.near_dedup.enabled, cfg.exact_dedup.enabled
    dedup = near or exact
    prepare = [ReadCorpus(w, cfg, inputs), Measure(w, cfg, "input"), Select(w, cfg)]
    if cfg.filters.enabled:
        prepare.append(QualityFilters(w, cfg))
    if cfg.decontamination.enabled:
        prepare.append(Decontaminate(w, cfg))
    finish = []
    if dedup:
        prepare += [DedupKeys(work / "keys", cfg.select.licenses, cfg.dedup.rank, cfg.dedup.per_language),
                    WriteParquet(work / "intermediate", key, keep_id=True)]
        finish += [ReadTask(work / "intermediate", key), DropDuplicates(w, cfg)]
    if near:
        prepare.append(CodeMinhashSignature(str(work / "signatures"), cfg.near_dedup))
    if cfg.pii.enabled:
        finish.append(RedactPII(w, cfg))
    tail = [Measure(w, cfg, "output"), WriteParquet(work / "output" / "data", key)]
    plan = []
    if dedup:
        plan.append(("prepare", prepare, cfg.run.tasks))
        if near:
            from datatrove.pipeline.dedup import MinhashDedupBuckets
            # datatrove asserts tasks % num_buckets == 0: one task per bucket.
            plan.append(("buckets", [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"),
                                                         config=minhash_config(cfg.near_dedup))],
                         cfg.near_dedup.num_buckets))
        plan.append(("clusters", [RankedClusters(work / "keys", work / "buckets" if near else None,
                                                 work / "removals", exact)], 1))
        plan.append(("finish", finish + tail, cfg.run.tasks))
    else:  # nothing crosses documents: one pass
        plan.append(("prepare", prepare + finish + tail, cfg.run.tasks))
    plan.append(("report", [Finalize(w, output, cfg.run.examples)], 1))
    return plan


def _check_paths(inputs: list[str], output: Path, work: Path, resume: bool) -> None:
    from starcoder.data.corpus import list_input_files
    try:
        list_input_files(inputs)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output}: the output folder exists and is not empty (choose a new one)")
    if output.is_dir():
        output.rmdir()
    # datatrove skips tasks completed in its logging folder: a rerun into an old folder would
    # silently do nothing, so reusing one is explicit.
    if (work / "logs").exists() and not resume:
        raise UserError(f"{work}: holds an earlier run; pass --resume to continue it, or remove it")


def curate(inputs: list[str], output: str, cfg: CurateConfig, executor: str = "local",
           logging_dir: Optional[str] = None, resume: bool = False) -> Optional[dict]:
    """Runs (local, ray) or submits (slurm) the pipeline. Returns the report when it ran here."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor}: expected one of {' | '.join(EXECUTORS)}")
    output_path = Path(output).resolve()
    work = Path(logging_dir).resolve() if logging_dir else output_path.with_name(output_path.name + ".work")
    inputs = [str(Path(p).resolve()) for p in inputs]
    _check_paths(inputs, output_path, work, resume)
    plan = stages(cfg, inputs, str(output_path), work)
    previous = None
    for name, pipeline, tasks in plan:
        previous = _executor(executor, cfg, name, pipeline, tasks, work / "logs" / name, previous)
    if executor == "slurm":
        submit(previous)
        return None
    previous.run()
    return json.loads((output_path / "report.json").read_text())


def slurm_executor(pipeline: list, tasks: int, run, job_name: str, logs: Path, depends,
                   gpus_per_task: int = 0, skip_completed: bool = True):
    """datatrove's Slurm executor from a config's `run` section (slurm_partition, slurm_time,
    slurm_cpus_per_task, slurm_mem_per_cpu_gb), for curate and selfalign."""
    from datatrove.executor import SlurmPipelineExecutor
    if not run.slurm_partition:
        raise ConfigError("run.slurm_partition: set the Slurm partition for --executor slurm")
    # datatrove asks 2 GB per CPU unless told; small nodes offer less, so it is always set.
    sbatch = {"mem-per-cpu": f"{int(run.slurm_mem_per_cpu_gb * 1024)}M"}
    if gpus_per_task:
        sbatch["gpus-per-task"] = str(gpus_per_task)
    return SlurmPipelineExecutor(
        pipeline, tasks=tasks, time=run.slurm_time, partition=run.slurm_partition,
        cpus_per_task=run.slurm_cpus_per_task, job_name=job_name, logging_dir=str(logs),
        depends=depends, env_command=f"export PATH={Path(sys.executable).parent}:$PATH",
        sbatch_args=sbatch, mail_type="NONE", qos="", requeue=False, skip_completed=skip_completed)


def submit(last) -> None:
    """Submits a chain of Slurm executors (the last one submits those it depends on first)."""
    import subprocess
    try:
        last.run()
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        raise UserError(f"--executor slurm: sbatch failed ({err}); check run.slurm_partition, "
                        f"run.slurm_mem_per_cpu_gb and run.slurm_time") from None


def _executor(kind: str, cfg: CurateConfig, name: str, pipeline: list, tasks: int, logs: Path, depends):
    r = cfg.run
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(r.workers, tasks),
                                     logging_dir=str(logs), depends=depends)
    if kind == "slurm":
        return slurm_executor(pipeline, tasks, r, f"curate-{name}", logs, depends)
    try:
        from datatrove.executor.ray import RayPipelineExecutor
        import ray  # noqa: F401
    except ImportError as err:
        raise UserError("--executor ray needs `pip install ray`") from err
    return RayPipelineExecutor(pipeline, tasks=tasks, workers=r.workers, logging_dir=str(logs),
                               depends=depends, cpus_per_task=r.slurm_cpus_per_task,
                               mem_per_cpu_gb=r.slurm_mem_per_cpu_gb)
