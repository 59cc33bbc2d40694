"""The model-driven stages: S->C concepts, C->I tasks, I->R responses, and the optional
model-as-judge seed filter. Each builds one prompt per record, the prompt file's few-shot prefix
then the stage's query, and generates from it.

A prompt fits when its tokens plus the stage's `max_new_tokens` fit the model's context. One that
does not is dropped, counted under "prompt does not fit" (never cut: cutting a few-shot prefix
from the left breaks the pattern the model is asked to follow). Counts are in samples: a stage
asked for k samples of n records has `records_in` = n x k."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Callable

from starcoder.selfalign.config import GenerationStageConfig, SeedsConfig, TasksConfig
from starcoder.selfalign.report import StageReport

TOO_LONG = "prompt does not fit"
# The next few-shot example's header ends a concept list, a task and a judge answer; a response
# goes on through its own `### Tests` up to the next `### Instruction`.
NEXT_SECTION = ["\n### "]
NEXT_INSTRUCTION = ["\n### Instruction"]
YES_NO = re.compile(r"\b(yes|no)\b")


def concepts_query(record: dict) -> str:
    return f"### Snippet\n{record['seed'].strip()}\n\n### Concepts\n"


def tasks_query(record: dict) -> str:
    return (f"### Properties\ncategory: {record['category']}\nlanguage: {record['language']}\n"
            f"difficulty: {record['difficulty']}\nconcepts: {record['concepts']}\n\n### Task\n")


def responses_query(record: dict) -> str:
    return f"### Instruction\n{record['instruction'].strip()}\n\n### Response\n"


def judge_query(record: dict) -> str:
    return f"### Snippet\n{record['seed'].strip()}\n\n### Answer\n"


def generate_stage(name: str, records: list[dict], backend, cfg: GenerationStageConfig,
                   query: Callable[[dict], str], stop: list[str], seed: int,
                   ) -> tuple[list[tuple[dict, str]], StageReport]:
    """(record, output text) for every sample of every record whose prompt fits."""
    prefix = Path(cfg.prompt).read_text(encoding="utf-8")
    report = StageReport(name, len(records) * cfg.samples)
    prompts = [prefix + query(r) for r in records]
    lengths = backend.count_tokens(prompts)
    room = backend.context - cfg.max_new_tokens
    fits = [i for i, n in enumerate(lengths) if n <= room]
    report.drop(TOO_LONG, (len(records) - len(fits)) * cfg.samples)
    start = time.perf_counter()
    outputs = backend.generate([prompts[i] for i in fits], cfg.samples, cfg.max_new_tokens,
                               cfg.temperature, cfg.top_p, seed, stop) if fits else []
    seconds = time.perf_counter() - start
    tokens = sum(o.tokens for samples in outputs for o in samples)
    (prefix_tokens,) = backend.count_tokens([prefix])
    report.extra.update(
        input_records=len(records), samples_per_record=cfg.samples, prompt_file=cfg.prompt,
        prompt_prefix_tokens=prefix_tokens, context=backend.context,
        longest_prompt_tokens=max(lengths, default=0), generated_tokens=tokens,
        generation_seconds=round(seconds, 3), tokens_per_second=round(tokens / seconds, 1) if seconds else 0.0)
    pairs = [(records[i], o.text) for i, samples in zip(fits, outputs) for o in samples]
    return pairs, report


def concepts(records: list[dict], backend, cfg: GenerationStageConfig, seed: int):
    """Seeds in; each sample's first line, a list of concepts, as `concepts`."""
    pairs, report = generate_stage("concepts", records, backend, cfg, concepts_query, NEXT_SECTION, seed)
    out = []
    for record, text in pairs:
        line = text.strip().split("\n")[0].strip()
        if line:
            out.append({**record, "concepts": line})
        else:
            report.drop("empty output")
    return _finish(out, report)


def tasks(records: list[dict], backend, cfg: TasksConfig, seed: int):
    """Concepts in; the instruction written for drawn properties (category, difficulty) out."""
    draw = random.Random(seed)
    with_properties = [{**r, "category": draw.choice(cfg.categories), "language": cfg.language,
                        "difficulty": draw.choice(cfg.difficulties)} for r in records]
    pairs, report = generate_stage("tasks", with_properties, backend, cfg, tasks_query, NEXT_SECTION, seed)
    out = []
    for record, text in pairs:
        if text.strip():
            out.append({**record, "instruction": text.strip()})
        else:
            report.drop("empty output")
    return _finish(out, report)


def responses(records: list[dict], backend, cfg: GenerationStageConfig, seed: int):
    """Instructions in; each sample's raw output as `response` (validate parses it; an output
    that does not parse is counted there, not dropped here)."""
    pairs, report = generate_stage("responses", records, backend, cfg, responses_query,
                                   NEXT_INSTRUCTION, seed)
    out = [{**record, "response": text} for record, text in pairs]
    return _finish(out, report)


def judge(records: list[dict], backend, cfg: SeedsConfig) -> tuple[list[dict], StageReport]:
    """The reference's model-as-judge: few-shot yes/no, greedy, 5 tokens, kept when the answer
    says "yes" more often than "no"."""
    stage = GenerationStageConfig(prompt=cfg.judge_prompt, samples=1, temperature=0.0, max_new_tokens=5)
    pairs, report = generate_stage("judge", records, backend, stage, judge_query, NEXT_SECTION, 0)
    out = []
    for record, text in pairs:
        words = YES_NO.findall(text.lower())
        if words.count("yes") > words.count("no"):
            out.append(record)
        else:
            report.drop("judge said no")
    return _finish(out, report)


def _finish(out: list[dict], report: StageReport) -> tuple[list[dict], StageReport]:
    report.records_out = len(out)
    report.check()
    return out, report
