"""HumanEval infilling (Bavarian et al. 2022), derived from the canonical solutions.

Single-line: each non-blank line of a solution is the middle (1,033 tasks; 1,113 counting blank
lines). Multi-line: each span of consecutive non-blank lines (lines i..j of the non-blank ones,
with any blank lines between them) is the middle, m(m+1)/2 spans for m lines (5,815; 6,838
counting blank lines). The prefix is the prompt plus the lines before, the suffix the lines
after; the model sees them in its FIM format and pass@1 is scored by executing prefix + infill
+ suffix with the tests. `exact-match` compares infills with `canonical_solution` instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from starcoder.config import UserError
from starcoder.eval.humaneval import Options, load_problems, program
from starcoder.eval.passk import pass_at_k
from starcoder.eval.records import JsonlLog, check_settings, write_json_atomic
from starcoder.eval.sandbox import Sandbox

MODES = ("single-line", "multi-line", "exact-match")


@dataclass
class InfillTask:
    task_id: str
    prefix: str
    middle: str
    suffix: str
    problem: dict | None = None


def derive_tasks(problems: list[dict], mode: str, count_blank_lines: bool = False) -> list[InfillTask]:
    tasks = []
    for problem in problems:
        lines = problem["canonical_solution"].splitlines(keepends=True)
        eligible = [i for i, line in enumerate(lines) if count_blank_lines or line.strip()]
        if mode == "single-line":
            spans = [(i, i) for i in eligible]
        else:
            spans = [(a, b) for n, a in enumerate(eligible) for b in eligible[n:]]
        for a, b in spans:
            middle = "".join(lines[a: b + 1])
            # The middle ends before its last newline, which starts the suffix.
            end = "\n" if middle.endswith("\n") else ""
            tasks.append(InfillTask(f"{problem['task_id']}/{mode}/{a}-{b}",
                                    problem["prompt"] + "".join(lines[:a]),
                                    middle[: len(middle) - len(end)],
                                    end + "".join(lines[b + 1:]), problem))
    return tasks


def read_exact_match_tasks(path: Path) -> list[InfillTask]:
    """santacoder-fim's fields per JSONL line: `prompt` (prefix), `suffix`, `canonical_solution`."""
    if not Path(path).is_file():
        raise UserError(f"--tasks: {path}: no such file")
    tasks = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            tasks.append(InfillTask(str(r.get("task_id", n - 1)), r["prompt"], r["canonical_solution"],
                                    r["suffix"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--tasks: {path}:{n}: expected JSON with prompt, suffix and "
                            f"canonical_solution") from None
    return tasks


def run_infill(generator, mode: str, output: Path, opts: Options, sandbox: Sandbox | None,
               model_name: str = "", tasks_file: Path | None = None) -> dict:
    """Greedy infills for every task (resumable), then pass@1 by execution or exact match."""
    if mode == "exact-match":
        if tasks_file is None:
            raise UserError("--tasks: exact-match needs a JSONL file of prompt/suffix/canonical_solution")
        tasks = read_exact_match_tasks(tasks_file)[: opts.limit]
    else:
        tasks = derive_tasks(load_problems(), mode)[: opts.limit]
    output = Path(output)
    check_settings(output, {"model": model_name, "mode": mode, "max_new_tokens": opts.max_new_tokens,
                            "limit": opts.limit, "tasks": str(tasks_file) if tasks_file else None})
    log = JsonlLog(output / "infills.jsonl")
    done = log.keys()
    todo = [t for t in tasks if (t.task_id, 0) not in done]
    stop = ["\n"] if mode == "single-line" else []
    with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="infill", unit="task") as bar:
        for start in range(0, len(todo), opts.batch_size):
            batch = todo[start: start + opts.batch_size]
            prompts = [generator.fim_prompt(t.prefix, t.suffix) for t in batch]
            completions = generator.complete(prompts, opts.max_new_tokens, stop=stop,
                                             batch_size=len(batch))
            log.append([{"task_id": t.task_id, "sample": 0, "completion": c.text,
                         "truncated": c.truncated, "too_long": c.too_long}
                        for t, c in zip(batch, completions)])
            bar.update(len(batch))
    infills = {r["task_id"]: r["completion"] for r in log.records}
    summary = {"task": f"humaneval-infill/{mode}", "tasks": len(tasks),
               "truncated_prompts": sum(bool(r.get("truncated")) for r in log.records),
               "too_long_prompts": sum(bool(r.get("too_long")) for r in log.records)}
    if mode == "exact-match":
        summary["exact_match"] = sum(infills[t.task_id].strip() == t.middle.strip()
                                     for t in tasks) / max(len(tasks), 1)
    else:
        results = JsonlLog(output / "infills.jsonl_results.jsonl")
        todo = [t for t in tasks if (t.task_id, 0) not in results.keys()]
        with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="execute", unit="program") as bar:
            for start in range(0, len(todo), 64):
                batch = todo[start: start + 64]
                programs = [program(t.problem, t.prefix + infills[t.task_id] + t.suffix) for t in batch]
                outcomes = sandbox.run_many(programs, opts.timeout, opts.workers,
                                            progress=lambda i, r: bar.update(1))
                results.append([{"task_id": t.task_id, "sample": 0, "completion": infills[t.task_id],
                                 "result": r.result, "passed": r.passed} for t, r in zip(batch, outcomes)])
        summary.update(pass_at_k(results.records, [1]))
    write_json_atomic(output / "summary.json", summary)
    return summary
