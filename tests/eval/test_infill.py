"""HumanEval infilling tasks: the paper's counts, exact reassembly, and a run with a model."""

import json

import pytest

from starcoder.eval.humaneval import Options, load_problems, program
from starcoder.eval.infill import derive_tasks, run_infill
from tests.eval.test_humaneval import run_cli


@pytest.mark.parametrize("mode, blank, count", [
    ("single-line", False, 1033), ("single-line", True, 1113),
    ("multi-line", False, 5815), ("multi-line", True, 6838),
])
def test_task_counts_are_the_papers(mode, blank, count):
    tasks = derive_tasks(load_problems(), mode, count_blank_lines=blank)
    assert len(tasks) == count
    assert len({t.task_id for t in tasks}) == count


@pytest.mark.parametrize("mode", ["single-line", "multi-line"])
def test_prefix_middle_suffix_reassemble_the_canonical_program(mode):
    for task in derive_tasks(load_problems(), mode):
        p = task.problem
        assert task.prefix + task.middle + task.suffix == p["prompt"] + p["canonical_solution"]
        assert task.middle.strip() and not task.middle.endswith("\n")
        if mode == "single-line":
            assert "\n" not in task.middle


def test_canonical_middles_pass_and_empty_ones_fail(sandbox):
    tasks = derive_tasks(load_problems(3), "single-line")
    good = sandbox.run_many([program(t.problem, t.prefix + t.middle + t.suffix) for t in tasks])
    assert all(r.passed for r in good)
    # Removing a `return` line breaks every task whose middle it is.
    returns = [t for t in tasks if t.middle.strip().startswith("return")]
    bad = sandbox.run_many([program(t.problem, t.prefix + "    pass" + t.suffix) for t in returns])
    assert returns and not any(r.passed for r in bad)


def test_infill_run_with_a_model_is_resumable(sandbox, tiny_models, tmp_path):
    from starcoder.generation import load_generator

    gen = load_generator(tiny_models["sc2"]["native"])
    opts = Options(max_new_tokens=12, batch_size=4, limit=5)
    summary = run_infill(gen, "single-line", tmp_path / "inf", opts, sandbox, "tiny")
    assert summary["tasks"] == 5 and "pass@1" in summary
    infills = [json.loads(x) for x in open(tmp_path / "inf" / "infills.jsonl")]
    assert len(infills) == 5 and all("\n" not in r["completion"] for r in infills)
    assert run_infill(gen, "single-line", tmp_path / "inf", opts, sandbox, "tiny") == summary


def test_exact_match_on_santacoder_fim_fields(tiny_models, tmp_path, capsys):
    tasks = tmp_path / "fim.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n    ", "suffix": "\n",
                                         "canonical_solution": "return x"}) + "\n" for i in range(3)))
    code, _, err = run_cli(capsys, "eval", "humaneval-infill", "--model", tiny_models["sc1"]["native"],
                           "--mode", "exact-match", "--tasks", tasks, "--max-new-tokens", 4,
                           "--output", tmp_path / "em")
    assert code == 0, err
    summary = json.loads((tmp_path / "em" / "summary.json").read_text())
    assert summary["tasks"] == 3 and 0.0 <= summary["exact_match"] <= 1.0
    code, _, err = run_cli(capsys, "eval", "humaneval-infill", "--model", tiny_models["sc1"]["native"],
                           "--mode", "exact-match", "--output", tmp_path / "em2")
    assert code == 2 and err.startswith("error: --tasks")
