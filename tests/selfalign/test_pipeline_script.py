"""tools/selfalign_pipeline.sh end to end on the `make train` model (2 steps): selfalign on the
planted responses (some pass), preprocess, the StarCoder2-Instruct recipe at the tiny shape, and
HumanEval on 2 problems; a rerun after the data is remade refuses to resume the run; and a
selection that kept nothing stops before preprocess with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from starcoder.config import load_config
from starcoder.selfalign.report import read_jsonl

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "selfalign_pipeline.sh"
PLANTED = Path(__file__).with_name("planted.jsonl")
RECIPE = REPO / "configs" / "recipes" / "starcoder2-instruct-sft.yaml"
# The recipe's layout and length at one CPU process and the tiny model's 256-token context.
TINY_TRAIN = ("--set parallel.tensor_parallel=1 --set parallel.sequence_parallel=false "
              "--set parallel.distributed_optimizer=false --set train.seq_length=256 "
              "--set train.global_batch_size=4 --set train.micro_batch_size=4 "
              "--set train.precision=fp32 --set log.progress_bar=false")


@pytest.fixture(scope="module")
def model(demo_run):
    return demo_run


def pipeline(out, model, responses, **settings):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "OUT": str(out),
           "MODEL": str(model), "SELFALIGN_ARGS": f"--stages validate,select --input {responses} "
                                                   "--set validate.timeout=1.0", **settings}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)


def test_every_step_runs_on_planted_responses_and_a_remade_dataset_is_not_resumed(model, tmp_path, sandbox):
    out = tmp_path / "pipeline"
    settings = dict(MODEL_SHAPE="tiny-sc2", TRAIN_SET=TINY_TRAIN,
                    EVAL_ARGS="--limit 2 --n-samples 1 --max-new-tokens 16")
    done = pipeline(out, model, PLANTED, **settings)
    assert done.returncode == 0, done.stderr[-3000:]
    passing = {r["instruction"] for r in read_jsonl(PLANTED) if r["expected"] == "pass"}
    selected = read_jsonl(out / "selfalign" / "select" / "00000.jsonl")
    assert sorted(r["instruction"] for r in selected) == sorted(passing)
    for name in ("instruct.bin", "instruct.idx", "instruct_loss_mask.bin", "instruct_loss_mask.idx"):
        assert (out / "data" / name).is_file(), name
    assert json.loads((out / "data" / "instruct.json").read_text())["documents"] == len(passing)
    # The recipe trained the base at the tiny shape, on this data, with the base's tokenizer.
    latest = (out / "run" / "checkpoints" / "latest").read_text().strip()
    step = out / "run" / "checkpoints" / latest
    assert (step / "manifest.json").is_file() and (step / "tokenizer.json").is_file()
    trained = yaml.safe_load((step / "config.yaml").read_text())
    recipe = load_config(RECIPE).train
    assert trained["model"] == yaml.safe_load(load_config("tiny-sc2").to_yaml())["model"]
    assert trained["train"]["init_from"] == str(model) and trained["train"]["lr"] == recipe.lr
    assert trained["train"]["objective"] == "sft" and trained["train"]["epochs"] == recipe.epochs
    assert [p["path"] for p in trained["data"]["paths"]] == [str(out / "data" / "instruct")]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["problems"] == 2 and 0.0 <= summary["pass@1"] <= 1.0
    assert f"HumanEval          {out}/eval/summary.json" in done.stdout

    # Data remade after the run began: preprocess is skipped, train refuses to resume on it.
    os.utime(out / "data" / "instruct.json")
    again = pipeline(out, model, PLANTED, **settings)
    assert again.returncode == 2
    assert "instruct.json is newer than" in again.stdout
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: {out}/data/instruct was remade after {out}/run began: delete {out}/run to train on it")


def test_a_selection_that_kept_nothing_stops_before_preprocess_with_one_line(tmp_path, sandbox):
    failing = tmp_path / "failing.jsonl"  # no passing response, and none that times out (cheap)
    failing.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(PLANTED)
                               if r["expected"] in ("fail", "unparsable")))
    out = tmp_path / "pipeline"
    stopped = pipeline(out, tmp_path / "unused", failing)  # validate and select need no model
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"error: selfalign kept no passing response: nothing to fine-tune on; "
        f"see {out}/selfalign/report.json")
    assert "== 2/4" not in stopped.stdout and not (out / "data").exists()


def test_a_wrong_model_shape_stops_before_selfalign(tmp_path):
    out = tmp_path / "pipeline"
    stopped = pipeline(out, tmp_path / "base", PLANTED, MODEL_SHAPE="tiny-sc3")
    assert stopped.returncode == 2
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        "error: MODEL_SHAPE=tiny-sc3: config tiny-sc3: no such file or preset (presets: ")
    assert not out.exists()
