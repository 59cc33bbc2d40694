"""`train.eval_humaneval_every`: pass@1 of the live model in metrics.jsonl; sandbox checked first."""

from pathlib import Path

import pytest

from starcoder.config import ConfigError, load_config
from starcoder.eval.sandbox import SandboxUnavailable
from starcoder.training.trainer import train
from tests.training.helpers import make_corpus, metrics, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), files=4)


def test_humaneval_every_n_steps_logs_pass_at_1(sandbox, corpus, tmp_path, one_thread):
    cfg = tiny_config(corpus, tmp_path / "run", "train.eval_humaneval_every=2",
                      "train.eval_humaneval_limit=2")
    train(cfg)
    records = [r for r in metrics(tmp_path / "run") if "humaneval_pass@1" in r]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["humaneval_problems"] == 2 and 0.0 <= r["humaneval_pass@1"] <= 1.0 for r in records)
    # The run folder (its latest checkpoint) generates as it is.
    from starcoder.generation import load_generator

    assert load_generator(tmp_path / "run").complete(["def f():\n"], max_new_tokens=4)[0].tokens


def test_a_missing_sandbox_stops_the_run_before_step_1(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap, no prlimit
    cfg = tiny_config(corpus, tmp_path / "run", "train.eval_humaneval_every=2")
    with pytest.raises(SandboxUnavailable, match="bwrap"):
        train(cfg)
    assert not [r for r in metrics(tmp_path / "run") if "loss" in r]


@pytest.mark.parametrize("key, value", [("eval_humaneval_every", -1), ("eval_humaneval_limit", 0),
                                        ("eval_humaneval_limit", 165)])
def test_config_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        load_config("tiny-sc2", [f"train.{key}={value}"])


def test_problems_are_split_across_data_parallel_ranks(sandbox):
    from types import SimpleNamespace

    from starcoder.eval.training import HumanEvalHook

    cfg = load_config("tiny-sc2", ["train.eval_humaneval_every=1"])
    hooks = [HumanEvalHook(SimpleNamespace(cfg=cfg, grid=SimpleNamespace(tp_rank=0, dp_rank=r, dp=3)))
             for r in range(3)]
    ids = [p["task_id"] for h in hooks for p in h.problems]
    assert sorted(ids) == sorted(f"HumanEval/{i}" for i in range(164)) and len(ids) == 164
    assert all(h.count == 164 for h in hooks)


def _train_two_ranks(corpus, out):
    return train(tiny_config(corpus, Path(out), "train.micro_batch_size=2",
                             "train.eval_humaneval_every=4", "train.eval_humaneval_limit=3")).step


def test_two_data_parallel_ranks_log_one_pass_at_1(sandbox, corpus, tmp_path):
    from tests.distributed import World

    with World(2) as world:
        assert world.run(_train_two_ranks, corpus, str(tmp_path / "dp")) == [4, 4]
    records = [r for r in metrics(tmp_path / "dp") if "humaneval_pass@1" in r]
    assert len(records) == 1 and records[0]["step"] == 4 and records[0]["humaneval_problems"] == 3
