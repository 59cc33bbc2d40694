"""The planner on the presets: pinned facts, exact parameter counts, the CLI."""

import json

import pytest
import torch

from starcoder.cli import main
from starcoder.cli.plan import parse_memory
from starcoder.config import PRESET_DIR, load_config
from starcoder.models.gpt import GPT
from starcoder.planning import parameters_per_rank, plan_layout, rank_layouts

GiB = 2 ** 30
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def test_starcoder_15b_fits_at_its_training_layout():
    # bigcode trained StarCoder-15B at TP 4 x PP 4, micro-batch 1, 8K context on A100 80GB.
    cfg = load_config("starcoder-15b", ["parallel.pipeline_parallel=4"])
    plan = plan_layout(cfg, nodes=64)
    assert plan.fits and plan.total < 80 * GiB
    assert plan.layout["data_parallel"] == 32


def test_an_impossible_layout_does_not_fit_and_names_the_dominant_term():
    plan = plan_layout(load_config("starcoder2-15b", ["parallel.tensor_parallel=1",
                                                      "parallel.sequence_parallel=false"]))
    assert not plan.fits
    assert plan.dominant == "optimizer"  # 16 B of fp32 state per parameter on one GPU
    long = plan_layout(load_config("starcoderbase-1b", ["train.micro_batch_size=64"]))
    assert not long.fits and long.dominant == "activations"


@pytest.mark.parametrize("name", ["tiny-sc1", "tiny-sc2", "starcoderbase-1b", "starcoder2-3b"])
def test_parameters_are_exact_at_tp1(name):
    m = load_config(name).model
    with torch.device("meta"):
        model = GPT(m)
    assert parameters_per_rank(m, 1, m.num_layers, True, True) == sum(p.numel() for p in model.parameters())


def test_state_bytes_follow_the_mixed_precision_layout():
    cfg = load_config("tiny-sc2", ["train.precision=bf16", "parallel.distributed_optimizer=true",
                                  "train.micro_batch_size=2"])
    n = parameters_per_rank(cfg.model, 1, cfg.model.num_layers, True, True)
    terms = plan_layout(cfg, nodes=1, gpus_per_node=4).terms  # DP 4
    assert (terms["weights"], terms["gradients"]) == (2 * n, 4 * n)
    assert (terms["main_weights"], terms["optimizer"]) == (4 * n // 4, 8 * n // 4)  # 6 + 12/DP


def test_ranking_puts_fitting_layouts_first_fastest_first():
    plans = rank_layouts(load_config("starcoder2-7b"), nodes=2)
    fits = [p.fits for p in plans]
    assert fits[0] and fits == sorted(fits, reverse=True)
    times = [p.step_time_s for p in plans if p.fits]
    assert times == sorted(times)


def test_parse_memory():
    assert parse_memory("80GB") == parse_memory("80 GiB") == 80 * GiB
    assert parse_memory("141GB") == 141 * GiB


class _Result:
    def __init__(self, code, captured):
        self.returncode, self.stdout, self.stderr = code, captured.out, captured.err


@pytest.fixture
def _cli(capsys):
    def run(*args):
        code = main(["plan", *args])
        return _Result(code, capsys.readouterr())
    return run


def test_cli_every_preset_at_its_layout(_cli):
    for name in PRESETS:
        out = _cli("--config", name, "--json")
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert isinstance(report["fits"], bool) and report["total"] == sum(report["terms"].values())
    text = _cli("--config", "starcoder2-15b", "--nodes", "8")
    assert text.returncode == 0 and "TP" in text.stdout


def test_cli_bad_input_is_one_line(_cli):
    out = _cli("--config", "tiny-sc1", "--gpu-memory", "lots")
    assert out.returncode == 2 and out.stderr.strip() == \
        "error: --gpu-memory: expected a size like 80GB, got 'lots'"
    out = _cli("--config", "tiny-sc1", "--nodes", "3", "--gpus-per-node", "1",
               "--set", "parallel.tensor_parallel=2")
    assert out.returncode == 2 and "parallel.tensor_parallel" in out.stderr
