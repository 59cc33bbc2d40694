"""MFU, the GPU peak table, metrics.jsonl and the console line."""

import json

import pytest
import torch

from starcoder.config import load_config
from starcoder.models.flops import model_flops_per_token
from starcoder.training.metrics import (MetricsLogger, console_line, lookup_peak, mfu,
                                        peak_tflops)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("Some Future GPU", None)])
def test_peak_table_by_device_name(name, peak):
    assert lookup_peak(name) == peak


def test_no_peak_on_cpu_unless_overridden():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), override=1.5) == 1.5
    assert mfu(1e9, 1000.0, None, 1) is None


def test_mfu_is_model_flops_times_throughput_over_peak():
    cfg = load_config("starcoder2-3b")
    per_token = model_flops_per_token(cfg.model, cfg.train.seq_length)
    # 8 H100s at 3,000 tokens/s each
    value = mfu(per_token, 8 * 3000.0, 989.0, 8)
    # 6N (tied: the embedding counted once, as the output layer) + 12 x layers x heads x head_dim
    # x mean keys per query ((4096 + 1) / 2 under the 4096 window)
    by_hand = 6 * 3_030_371_328 + 12 * 30 * 24 * 128 * 2048.5
    assert value == pytest.approx(by_hand * 3000.0 / 989e12)


def test_jsonl_drops_records_after_the_resumed_step(tmp_path):
    cfg = load_config("tiny-sc2", ["log.tensorboard=false", "log.progress_bar=false"])
    record = dict(lr=1e-3, grad_norm=1.0, tokens_per_s=10.0, mfu=None, consumed_samples=8,
                  mem_gib=0.1, skipped_steps=0)
    logger = MetricsLogger(cfg, tmp_path, enabled=True, start_step=0)
    for step in range(1, 6):
        logger.log({"step": step, "loss": float("nan") if step == 5 else 1.0 / step, **record})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5] and lines[4]["loss"] is None
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line torn by SIGKILL
    MetricsLogger(cfg, tmp_path, enabled=True, start_step=3).close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]


def test_console_line():
    line = console_line({"step": 10, "loss": 2.5, "lr": 3e-4, "grad_norm": 0.75,
                         "tokens_per_s": 123456.0, "mfu": 0.412, "mem_gib": 12.25,
                         "skipped_steps": 1})
    assert line == ("step      10 | loss 2.5000 | lr 3.000e-04 | grad 0.750 | 123,456 tok/s | "
                    "mfu 41.2% | mem 12.25 GiB | skipped 1")


def test_console_line_of_validation():
    assert console_line({"step": 8, "val_loss": 2.5, "val_ppl": 12.18}) == \
        "step       8 | validation loss 2.5000 | ppl 12.18"
    dpo = {"step": 8, "val_loss": 0.6, "val_rewards/accuracies": 0.75, "val_rewards/margins": 0.125,
           "val_rewards/chosen": 0.1}
    assert console_line(dpo) == ("step       8 | validation loss 0.6000 | reward accuracy 0.750 | "
                                 "margin 0.1250")
