"""`kernels: auto` checks each Triton kernel against its reference once at model set-up: a wrong
kernel (monkeypatched here) is replaced by its reference for that op, with one log line, and every
rank agrees. Without a GPU the CUDA condition is forced by pointing `AUTO_DEVICE` at the CPU, where
the real kernels run under the Triton interpreter."""

import logging

import pytest
import torch
import torch.nn.functional as F

from starcoder import kernels
from starcoder.config import ModelConfig
from starcoder.models import GPT, ops, self_check
from starcoder.models import attention as attention_module
from starcoder.models.attention import attention_backend, uses_triton
from tests.distributed import World
from tests.kernels.checks import DEVICE

CFG = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  vocab_size=96, max_position_embeddings=32, sliding_window=8)
SHAPES = self_check.Shapes.of(CFG)


def wrong_layer_norm(x, weight, bias, eps, residual=None):
    """Plausible numbers, wrong ones: weight and bias swapped."""
    return kernels.layer_norm_reference(x, bias, weight, eps, residual)


def wrong_bias_gelu(x, bias):
    return kernels.bias_gelu_reference(x, -bias)


@pytest.fixture
def checks(monkeypatch):
    """A fresh process state, `auto` behaving on the CPU as on CUDA, and the checks limited to the
    kernels a test names (each real check costs seconds under the interpreter)."""
    monkeypatch.setattr(self_check, "_outcome", {})
    monkeypatch.setattr(attention_module, "AUTO_DEVICE", DEVICE.type)
    monkeypatch.setattr(attention_module, "_triton_available", lambda: True)

    def only(*names):
        monkeypatch.setattr(self_check, "CHECKS", {n: self_check.CHECKS[n] for n in names})
    return only


def test_correct_kernels_pass(checks, caplog):
    checks("layer_norm", "bias_gelu")
    with caplog.at_level(logging.WARNING, logger="starcoder.models.self_check"):
        outcome = self_check.run_self_checks(DEVICE, torch.float16, SHAPES)  # fp32: next test
    assert outcome == {"layer_norm": True, "bias_gelu": True}
    assert caplog.records == []


def test_a_wrong_kernel_is_replaced_by_its_reference(checks, monkeypatch, caplog):
    checks("layer_norm", "bias_gelu")
    monkeypatch.setattr(kernels, "layer_norm", wrong_layer_norm)
    model = GPT(CFG).to(DEVICE)
    with caplog.at_level(logging.WARNING, logger="starcoder.models.self_check"):
        model.set_kernels("auto")
        model.set_kernels("auto")  # checks once per process: no second check, no second line
    assert self_check._outcome == {"layer_norm": False, "bias_gelu": True}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert f"Triton layer_norm kernel failed its self-check in float32 on {DEVICE.type}" in lines[0]
    assert "output 0 relative error" in lines[0]

    norm = model.blocks["0"].attn_norm
    norm.bias.data.normal_()  # weight 1, bias 0 at init would hide the swap
    x = torch.randn(3, CFG.hidden_size, device=DEVICE)
    assert norm.backend == "auto"
    assert not uses_triton("auto", x, "layer_norm") and uses_triton("auto", x, "bias_gelu")
    expected = F.layer_norm(x, (CFG.hidden_size,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(x), expected)  # the op runs the reference
    # ... which matters: the (wrong) kernel is still what an explicit `triton` runs.
    wrong = ops.layer_norm(x, norm.weight, norm.bias, norm.eps, backend="triton")
    assert (wrong - expected).abs().max() > 0.1


def test_a_wrong_attention_kernel_sends_attention_to_pytorch(checks, monkeypatch, caplog):
    checks("flash_attention")
    monkeypatch.setattr(kernels, "flash_attention",
                        lambda q, k, v, causal=True, window=None, scale=None:
                        kernels.attention_reference(q, k, v, causal, None, scale))  # window lost
    assert attention_backend("auto", DEVICE.type, 0.0) == "triton"
    with caplog.at_level(logging.WARNING, logger="starcoder.models.self_check"):
        self_check.run_self_checks(DEVICE, torch.float32, SHAPES)
    assert "Triton flash_attention kernel failed" in caplog.text
    assert attention_backend("auto", DEVICE.type, 0.0) == "torch"


def test_a_kernel_that_raises_is_not_trusted(checks, monkeypatch):
    checks("bias_gelu")

    def broken(x, bias):
        raise RuntimeError("out of resources: shared memory")
    monkeypatch.setattr(kernels, "bias_gelu", broken)
    assert self_check.run_self_checks(DEVICE, torch.float32, SHAPES) == {"bias_gelu": False}


def _check_on_rank(bad_rank):
    """On every rank of the world: check bias_gelu, whose kernel is wrong on `bad_rank` only (and
    the reference itself elsewhere: the interpreter would only add time)."""
    import torch.distributed as dist

    self_check._outcome.clear()
    self_check.CHECKS = {"bias_gelu": self_check.CHECKS["bias_gelu"]}  # this worker's copy
    bad = dist.get_rank() == bad_rank
    kernels.bias_gelu = wrong_bias_gelu if bad else kernels.bias_gelu_reference
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("starcoder.models.self_check").addHandler(handler)
    return self_check.run_self_checks(torch.device("cpu"), torch.float32, SHAPES), records


def test_ranks_agree_on_the_outcome():
    with World(2) as world:
        results = world.run(_check_on_rank, 1)
    assert [outcome for outcome, _ in results] == [{"bias_gelu": False}] * 2
    (good_line,), (bad_line,) = (lines for _, lines in results)
    assert "on another rank" in good_line and "output 0 relative error" in bad_line


def test_checks_run_under_inference_mode(checks, monkeypatch):
    """A loader may set kernels under inference_mode: that must not fail a kernel's backward."""
    checks("bias_gelu")
    monkeypatch.setattr(kernels, "bias_gelu", kernels.bias_gelu_reference)
    with torch.inference_mode():
        assert self_check.run_self_checks(DEVICE, torch.float32, SHAPES) == {"bias_gelu": True}
