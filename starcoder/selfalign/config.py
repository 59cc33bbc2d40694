"""The `starcoder selfalign` configuration: one validated section per stage, plus generation and
run settings. A YAML file holds any of the sections (`configs/selfalign/default.yaml` is the
paper's setting); `--set responses.samples=4` overrides a key. Prompt paths are relative to the
config file's folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from starcoder.config import ConfigError, apply_overrides, config_from_dict, need, read_config_file

STAGES = ("seeds", "concepts", "tasks", "responses", "validate", "select")
# The stages that generate text with the model.
GENERATION_STAGES = ("concepts", "tasks", "responses")


@dataclass
class SeedsConfig:
    max_lines: int = 150  # filter_dataset.py's limit; the tiny run asks for much shorter seeds
    near_dedup_threshold: float = 0.5
    max_seeds: int = 0  # keep at most this many (a seeded sample); 0: all
    judge: bool = False  # the model-as-judge filter (few-shot yes/no, greedy, 5 tokens)
    judge_prompt: str = "prompts/judge.txt"


@dataclass
class GenerationStageConfig:
    prompt: str = ""  # the few-shot prefix; the stage appends its query (docs/selfalign.md)
    samples: int = 1  # outputs per input record
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class TasksConfig(GenerationStageConfig):
    prompt: str = "prompts/tasks.txt"
    # C->I properties, drawn per record with the run's seed, as the reference does.
    categories: list[str] = field(default_factory=lambda: [
        "function implementation", "class implementation", "program implementation"])
    difficulties: list[str] = field(default_factory=lambda: ["easy", "medium", "hard"])
    language: str = "python"


@dataclass
class ValidateConfig:
    timeout: float = 10.0  # seconds of wall clock per sample; pass = exit 0 within it
    workers: int = 0  # parallel sandboxes; 0: one per core


@dataclass
class SelectConfig:
    threshold: float = 0.7
    num_perm: int = 250
    ngram: int = 5


@dataclass
class GenerationConfig:
    batch_size: int = 8  # prompts per forward (native backend)
    dtype: str = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    tensor_parallel: int = 1  # vLLM only


@dataclass
class RunConfig:
    seed: int = 0
    shards: int = 4  # each stage's records are split into this many shards (the resume unit)
    tasks: int = 1  # executor tasks per stage (each loads the model once and takes every
    # tasks-th shard); the local executor runs `workers` at once
    workers: int = 1
    slurm_partition: Optional[str] = None
    slurm_time: str = "04:00:00"
    slurm_mem_per_cpu_gb: float = 2.0
    slurm_cpus_per_task: int = 1
    slurm_gpus_per_task: int = 0  # generation stages on GPU nodes


@dataclass
class SelfAlignConfig:
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    concepts: GenerationStageConfig = field(default_factory=lambda: GenerationStageConfig(
        prompt="prompts/concepts.txt", max_new_tokens=128))
    tasks: TasksConfig = field(default_factory=TasksConfig)
    responses: GenerationStageConfig = field(default_factory=lambda: GenerationStageConfig(
        prompt="prompts/responses.txt", samples=10, max_new_tokens=1024))
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "selfalign" / "default.yaml"


def load_selfalign_config(source: str | Path | None = None,
                          overrides: list[str] | None = None) -> SelfAlignConfig:
    path = Path(source) if source is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config {path}: no such file")
    cfg = config_from_dict(apply_overrides(read_config_file(path), overrides), SelfAlignConfig)
    # Prompt paths become absolute: the resolved config saved with a run names the files used.
    base = path.resolve().parent
    cfg.seeds.judge_prompt = str(base / cfg.seeds.judge_prompt)
    for stage in GENERATION_STAGES:
        getattr(cfg, stage).prompt = str(base / getattr(cfg, stage).prompt)
    validate(cfg)
    return cfg


def validate(cfg: SelfAlignConfig) -> None:
    s = cfg.seeds
    need(s.max_lines >= 1, "seeds.max_lines", "must be at least 1")
    need(0 < s.near_dedup_threshold <= 1, "seeds.near_dedup_threshold", "must be in (0, 1]")
    need(s.max_seeds >= 0, "seeds.max_seeds", "must be at least 0 (0: all)")
    prompts = [("seeds.judge_prompt", s.judge_prompt)] if s.judge else []
    for stage in GENERATION_STAGES:
        g = getattr(cfg, stage)
        need(g.samples >= 1, f"{stage}.samples", "must be at least 1")
        need(g.temperature >= 0, f"{stage}.temperature", "must be at least 0 (0: greedy)")
        need(0 < g.top_p <= 1, f"{stage}.top_p", "must be in (0, 1]")
        need(g.max_new_tokens >= 1, f"{stage}.max_new_tokens", "must be at least 1")
        prompts.append((f"{stage}.prompt", g.prompt))
    for key, prompt in prompts:
        need(Path(prompt).is_file(), key, f"{prompt}: no such file")
    need(bool(cfg.tasks.categories), "tasks.categories", "must list at least one category")
    need(bool(cfg.tasks.difficulties), "tasks.difficulties", "must list at least one difficulty")
    need(cfg.validate.timeout > 0, "validate.timeout", "must be positive")
    need(cfg.validate.workers >= 0, "validate.workers", "must be at least 0 (0: one per core)")
    need(0 < cfg.select.threshold <= 1, "select.threshold", "must be in (0, 1]")
    need(cfg.select.num_perm >= 2, "select.num_perm", "must be at least 2")
    need(cfg.select.ngram >= 1, "select.ngram", "must be at least 1")
    need(cfg.generation.batch_size >= 1, "generation.batch_size", "must be at least 1")
    need(cfg.generation.dtype in ("auto", "float32", "bfloat16", "float16"), "generation.dtype",
         f"{cfg.generation.dtype!r} is not one of auto | float32 | bfloat16 | float16")
    need(cfg.generation.tensor_parallel >= 1, "generation.tensor_parallel", "must be at least 1")
    r = cfg.run
    need(r.shards >= 1, "run.shards", "must be at least 1")
    need(1 <= r.tasks <= r.shards, "run.tasks", f"must be in [1, run.shards ({r.shards})]")
    need(r.workers >= 1, "run.workers", "must be at least 1")
    need(r.slurm_mem_per_cpu_gb > 0, "run.slurm_mem_per_cpu_gb", "must be positive")
    need(r.slurm_cpus_per_task >= 1, "run.slurm_cpus_per_task", "must be at least 1")
    need(r.slurm_gpus_per_task >= 0, "run.slurm_gpus_per_task", "must be at least 0")
