"""`starcoder info`: parameter counts equal the matching transformers model's for every preset."""

import subprocess
import sys

import pytest
import torch
import transformers

from starcoder.config import PRESET_DIR, load_config
from starcoder.convert.hf import hf_config
from starcoder.models.flops import count_parameters

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def transformers_count(cfg) -> int:
    hf = hf_config(cfg.model)
    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_equals_transformers(name):
    cfg = load_config(name)
    assert count_parameters(cfg.model) == transformers_count(cfg)


def test_info_command_prints_the_count():
    out = subprocess.run([sys.executable, "-m", "starcoder", "info", "--config", "starcoder2-15b"],
                         capture_output=True, text=True, check=True).stdout
    assert "parameters: 15957889024" in out.splitlines()
    out = subprocess.run([sys.executable, "-m", "starcoder", "info", "--config", "starcoder-15b"],
                         capture_output=True, text=True, check=True).stdout
    assert "parameters: 15517456384" in out.splitlines()


def test_info_reports_config_errors_in_one_line():
    res = subprocess.run([sys.executable, "-m", "starcoder", "info", "--config", "tiny-sc2",
                          "--set", "model.num_query_groups=3"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: model.num_attention_heads: 8 is not divisible by "
                                  "model.num_query_groups (3)")
