"""The windowed fallback without the Triton kernel: FlexAttention with a block mask (what CUDA
runs, compiled) equals the reference, forward and gradients; a window with attention dropout on
that path is refused at start-up with the keys named; the planner knows the path."""

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from starcoder.config import ConfigError, ModelConfig, load_config
from starcoder.kernels import attention_reference
from starcoder.models import attention as attention_module
from starcoder.models.attention import (check_window_dropout, masked_attention,
                                        sliding_window_mask, windowed_flex_attention)
from starcoder.planning import plan_layout
from starcoder.planning.memory import attention_path
from tests.kernels.checks import DEVICE, TOLERANCE, assert_close


@pytest.fixture
def eager_flex(monkeypatch):
    """On a GPU: Flex as the model runs it, compiled. On the CPU: uncompiled (compiling takes
    ~30 s here) and with its backward allowed: torch refuses CPU backward up front, but its eager
    implementation (the math the compiled kernel must equal) differentiates fine. What is tested
    there is this module's use of Flex: the block mask, query alignment, GQA and scale."""
    if DEVICE.type == "cuda":
        return
    monkeypatch.setattr(attention_module, "_flex_functions",
                        lambda: (torch_flex.flex_attention, torch_flex.create_block_mask))
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("q_heads, kv_heads, seq_q, seq_k, window", [
    (4, 4, 40, 40, None),   # causal MHA
    (4, 1, 40, 40, 7),      # window, MQA
    (6, 2, 150, 150, 33),   # window, GQA, more than one 128-block (a skipped block)
    (4, 2, 5, 37, 9),       # fewer queries than keys (end-aligned, as a cache decodes)
], ids=["causal-mha", "window-mqa", "window-gqa-blocks", "decode-window-gqa"])
def test_flex_fallback_equals_reference(eager_flex, q_heads, kv_heads, seq_q, seq_k, window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, s, h, 16, generator=g).to(DEVICE).requires_grad_()
               for s, h in ((seq_q, q_heads), (seq_k, kv_heads), (seq_k, kv_heads)))
    out = windowed_flex_attention(q, k, v, causal=True, window=window, scale=0.3)
    if seq_q == seq_k:
        ref = attention_reference(q, k, v, causal=True, window=window, scale=0.3)
    else:  # the reference aligns queries to the first keys; a cache's masked SDPA to the last
        mask = sliding_window_mask(seq_q, seq_k, window, True, q.device)
        ref = masked_attention(q, k, v, mask.expand(2, -1, -1), scale=0.3)
    seed = torch.randn(out.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), seed)
    ref_grads = torch.autograd.grad(ref, (q, k, v), seed)
    tol = TOLERANCE[torch.float32]  # compiled on a GPU, fp32 dots run as TF32
    assert_close(out, ref, tol, "output")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, tol, f"d{name}")


def _model(**overrides):
    return ModelConfig(**{"sliding_window": 8, "attention_dropout": 0.1, "kernels": "torch",
                          **overrides})


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_window_with_dropout_is_refused_on_cuda(kernels):
    with pytest.raises(ConfigError) as err:
        check_window_dropout(_model(kernels=kernels), seq_length=32, device_type="cuda")
    message = str(err.value)
    assert "\n" not in message
    for key in ("model.sliding_window", "model.attention_dropout", "model.kernels"):
        assert key in message


@pytest.mark.parametrize("device_type, overrides, seq_length", [
    ("cpu", {}, 32),                               # CPU: masked SDPA has dropout
    ("cuda", {"kernels": "triton"}, 32),           # explicit Triton: its own error per call
    ("cuda", {"attention_dropout": 0.0}, 32),      # no dropout: Flex serves it
    ("cuda", {"sliding_window": 32}, 32),          # the window covers the sequence: no mask
    ("cuda", {"sliding_window": None}, 32),
], ids=["cpu", "triton", "no-dropout", "window-covers-seq", "no-window"])
def test_window_with_dropout_is_allowed_elsewhere(device_type, overrides, seq_length):
    check_window_dropout(_model(**overrides), seq_length, device_type)


def test_planner_takes_flex_for_the_cuda_fallback():
    assert attention_path(load_config("tiny-sc2", ["model.kernels=torch"])) == "flex"
    assert attention_path(load_config("tiny-sc2", [])) == "flash"
    with pytest.raises(ConfigError, match="model.attention_dropout"):
        plan_layout(load_config("tiny-sc2", ["model.kernels=torch", "model.attention_dropout=0.1"]))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kv_heads, window", [(1, None), (2, 5)], ids=["mqa-causal", "gqa-window"])
def test_document_flex_fallback_equals_the_document_mask(eager_flex, kv_heads, window):
    """Packed documents on CUDA without the Triton kernel: Flex with the ids as a mask_mod equals
    SDPA with `document_mask` (lengths 1, 9, 140 and 20: one document crosses a 128-block)."""
    from starcoder.models.attention import document_flex_attention, document_mask

    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[0] * 1 + [1] * 9 + [2] * 140 + [3] * 20,
                        [0] * 170]).to(DEVICE)
    q, k, v = (torch.randn(2, 170, h, 16, generator=g).to(DEVICE).requires_grad_()
               for h in (4, kv_heads, kv_heads))
    out = document_flex_attention(q, k, v, ids, causal=True, window=window, scale=0.3)
    ref = masked_attention(q, k, v, document_mask(ids, True, window), scale=0.3)
    seed = torch.randn(out.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), seed)
    ref_grads = torch.autograd.grad(ref, (q, k, v), seed)
    tol = TOLERANCE[torch.float32]
    assert_close(out, ref, tol, "output")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, tol, f"d{name}")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_selective_recompute_keeps_the_flex_output(eager_flex, monkeypatch):
    """`model.recompute: selective` saves FlexAttention's output as it saves SDPA's: its forward
    runs once per step (eager Flex, its dense implementation counted; the compiled CUDA path is
    not measured here), and the gradients equal a run without recomputation."""
    import sys

    from torch.utils.checkpoint import checkpoint

    from starcoder.models import recompute

    if DEVICE.type == "cuda":
        pytest.skip("counts the eager implementation; CUDA runs compiled Flex")
    dense = sys.modules["torch._higher_order_ops.flex_attention"]
    forwards = []
    original = dense.math_attention
    monkeypatch.setattr(dense, "math_attention", lambda *a, **k: forwards.append(1) or original(*a, **k))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 40, h, 16, generator=g).requires_grad_() for h in (4, 2, 2))

    def block(q, k, v):
        return windowed_flex_attention(q.sin(), k, v, causal=True, window=9).cos()

    plain = torch.autograd.grad(block(q, k, v).sum(), (q, k, v))
    forwards.clear()
    out = checkpoint(block, q, k, v, use_reentrant=False, context_fn=recompute._selective_contexts)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert len(forwards) == 1
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b)
