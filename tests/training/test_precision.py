"""bf16 on CPU: weights held in bf16 with fp32 main weights train like fp32."""

import pytest
import torch

from starcoder.training.trainer import Trainer
from starcoder.training.signals import StopRequest
from tests.training.helpers import losses, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bf16_trains_tiny_sc2_within_two_percent_of_fp32(corpus, tmp_path):
    """50 steps (about 3 s each way); losses logged every 10 steps."""
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(corpus, tmp_path / precision, f"train.precision={precision}",
                                      "train.max_steps=50", "train.lr_decay_steps=100", "log.every=10"))
        with StopRequest() as stop:
            trainer.run(stop)
        trainer.close()
        runs[precision] = losses(tmp_path / precision), trainer
    (fp32, _), (bf16, trainer) = runs["fp32"], runs["bf16"]
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert {x.main.dtype for x in trainer.optimizer.pieces} == {torch.float32}
    assert fp32[-1] < fp32[0] - 1.5  # it trains
    assert len(bf16) == len(fp32) == 5
    assert all(abs(b - f) <= 0.02 * f for b, f in zip(bf16, fp32)), (bf16, fp32)
    assert bf16 != fp32
