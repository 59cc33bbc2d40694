"""`starcoder selfalign` end to end on the `make train` model (its path, `starcoder demo`, for 2
steps) with standard-library seeds and the tiny config: every stage runs, the counts add up, a
run killed in the responses stage resumes to the same files, and mistakes are one line."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from starcoder.cli import main
from starcoder.selfalign.report import read_jsonl

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "selfalign" / "tiny.yaml")
PLANTED = Path(__file__).with_name("planted.jsonl")
SHARDS = "run.shards=4"  # one instruction per responses shard: a kill lands between shards


@pytest.fixture(scope="module")
def model(demo_run):
    return str(demo_run)


def command(model, output, *extra):
    return ["selfalign", "--model", model, "--seeds", "stdlib", "--output", str(output),
            "--config", TINY, "--set", SHARDS, *extra]


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory, sandbox):
    out = tmp_path_factory.mktemp("selfalign") / "run"
    assert main(command(model, out)) == 0
    return out


def test_every_stage_runs_on_the_tiny_model_and_the_counts_add_up(uninterrupted, capsys):
    report = json.loads((uninterrupted / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["seeds", "concepts", "tasks", "responses", "validate", "select"]
    for s in stages.values():
        assert s["records_in"] == s["records_out"] + sum(s["drops"].values()), s["stage"]
    assert stages["seeds"]["records_out"] == 4  # seeds.max_seeds of the tiny config
    # Each stage reads what the one before wrote, times its samples (3 responses per task).
    assert stages["concepts"]["records_in"] == stages["seeds"]["records_out"]
    assert stages["tasks"]["records_in"] == stages["concepts"]["records_out"]
    assert stages["responses"]["records_in"] == 3 * stages["tasks"]["records_out"]
    assert stages["validate"]["records_in"] == stages["responses"]["records_out"] > 0
    assert stages["select"]["records_in"] == stages["validate"]["records_out"]
    v = stages["validate"]
    assert sum(v["statuses"].values()) == v["records_in"]
    assert sum(v["instructions_by_passes"].values()) == v["instructions"]
    assert stages["select"]["records_out"] == v["instructions_with_a_pass"] <= v["statuses"].get("pass", 0)
    for stage in ("concepts", "tasks", "responses"):
        assert stages[stage]["generated_tokens"] > 0 and stages[stage]["tokens_per_second"] > 0
        assert "prompt does not fit" not in stages[stage]["drops"]  # the short prompts fit 256
        assert stages[stage]["longest_prompt_tokens"] < stages[stage]["context"] == 256
    selected = read_jsonl(report["output"])
    assert len(selected) == stages["select"]["records_out"]
    assert all(set(r) == {"instruction", "response"} for r in selected)
    responses = [r for k in range(4) for r in read_jsonl(uninterrupted / "responses" / f"{k:05d}.jsonl")]
    assert len(responses) == stages["responses"]["records_out"]
    assert all(isinstance(r["response"], str) and r["instruction"] for r in responses)


def test_a_run_killed_in_the_responses_stage_resumes_to_the_same_files(model, uninterrupted, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "starcoder", *command(model, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reports = out / "reports" / "responses"
    deadline = time.monotonic() + 120
    while not list(reports.glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(reports.glob("*.json"))
    assert 1 <= len(finished) < 4, "the kill must land inside the responses stage"
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    assert main(command(model, out)) == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps  # finished shards not redone
    for stage in ("seeds", "concepts", "tasks", "responses", "validate", "select"):
        for shard in sorted((uninterrupted / stage).glob("*.jsonl")):
            assert (out / stage / shard.name).read_text() == shard.read_text(), f"{stage}/{shard.name}"


def test_a_rerun_with_other_settings_is_refused(model, uninterrupted, capsys):
    assert main(command(model, uninterrupted, "--set", "responses.temperature=0.5")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {uninterrupted}: its responses stage was run with other settings")
    assert "\n" not in err and "remove" in err


def test_validate_and_select_alone_on_a_user_file(tmp_path, sandbox, capsys):
    planted = read_jsonl(PLANTED)
    user = tmp_path / "responses.jsonl"
    user.write_text(PLANTED.read_text() + "{not json\n" + json.dumps({"instruction": "x"}) + "\n")
    out = tmp_path / "checked"
    assert main(["selfalign", "--stages", "validate,select", "--input", str(user), "--output", str(out),
                 "--set", "validate.timeout=1.0", "--set", "run.shards=2"]) == 0
    captured = capsys.readouterr()
    assert "2 malformed records skipped (first: line 15: not JSON)" in captured.err
    report = {s["stage"]: s for s in json.loads((out / "report.json").read_text())["stages"]}
    assert report["input"]["drops"] == {"not JSON": 1, "no text field `response`": 1}
    validated = [r for k in range(2) for r in read_jsonl(out / "validate" / f"{k:05d}.jsonl")]
    expected = {(r["instruction"], r["response"]): r["expected"] for r in planted}
    assert sorted((r["instruction"], r["raw"], r["status"]) for r in validated) == sorted(
        (i, raw, status) for (i, raw), status in expected.items())
    with_a_pass = {r["instruction"] for r in planted if r["expected"] == "pass"}
    assert sorted(r["instruction"] for r in read_jsonl(out / "select" / "00000.jsonl")) == sorted(with_a_pass)
    assert "validation: {" in captured.out


@pytest.mark.parametrize("args, message", [
    (["--stages", "concepts"], "--model: needed by the concepts stage"),
    (["--model", "missing", "--stages", "concepts"], "--model: "),
    (["--model", str(REPO / "configs"), "--backend", "vllm", "--stages", "responses"], "--model: "),
    (["--stages", "select,validate"], "--stages select,validate: list each stage once, in pipeline order"),
    (["--stages", "seeds,judge"], "--stages seeds,judge: expected some of seeds,concepts"),
    (["--stages", "seeds"], "--seeds: needed by the seeds stage"),
    (["--stages", "seeds", "--seeds", "no/such/folder"], "--seeds no/such/folder: no such file or folder"),
    (["--stages", "seeds", "--seeds", "stdlib", "--config", "no/such.yaml"], "config no/such.yaml: no such file"),
    (["--stages", "select"], "--stages select: reads the validate stage's output, which"),
    (["--stages", "select", "--input", "missing.jsonl"], "--input missing.jsonl: no such file"),
    (["--stages", "select", "--set", "select.treshold=0.5"], "select.treshold: unknown key (did you mean threshold?)"),
    (["--stages", "select", "--set", "run.tasks=17"], "run.tasks: must be in [1, run.shards (16)]"),
])
def test_mistakes_are_one_line(tmp_path, capsys, args, message):
    assert main(["selfalign", "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_vllm_backend_without_vllm_is_one_line(model, tmp_path, capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert main(["selfalign", "--model", model, "--backend", "vllm", "--stages", "responses",
                 "--input", str(PLANTED), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --backend vllm: vLLM is not installed (pip "
                                               "install vllm, on a machine with a CUDA GPU); use --backend native")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_seeds_from_the_rows_of_a_corpus_file(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    kept = 'def twice(x):\n    """Twice x."""\n    return 2 * x\n'
    rows.write_text("".join(json.dumps(r) + "\n" for r in (
        {"content": kept, "path": "a.py"}, {"content": "def f():\n    return 1\n"}, {"text": kept})))
    out = tmp_path / "out"
    assert main(["selfalign", "--stages", "seeds", "--input", str(rows), "--output", str(out)]) == 0
    assert [s["name"] for s in read_jsonl(out / "seeds" / "00000.jsonl")] == ["twice"]
    report = {s["stage"]: s for s in json.loads((out / "report.json").read_text())["stages"]}
    assert report["input"]["drops"] == {"no text field `content`": 1}
    assert report["seeds"]["drops"] == {'no """ docstring': 1} and report["seeds"]["records_out"] == 1


def test_the_seed_judge_runs_on_the_model_and_its_drops_are_counted(model, tmp_path):
    out = tmp_path / "out"
    assert main(["selfalign", "--model", model, "--seeds", "stdlib", "--stages", "seeds", "--output",
                 str(out), "--config", TINY, "--set", "seeds.judge=true"]) == 0
    (seeds,) = json.loads((out / "report.json").read_text())["stages"]
    assert seeds["judge"]["input_records"] == 4 and seeds["judge"]["generated_tokens"] > 0
    assert seeds["records_in"] == seeds["records_out"] + sum(seeds["drops"].values())
    said_no = seeds["drops"].get("judge: judge said no", 0)
    assert seeds["records_out"] + said_no + seeds["drops"].get("judge: prompt does not fit", 0) == 4
    assert len(read_jsonl(out / "seeds" / "00000.jsonl")) == seeds["records_out"]
