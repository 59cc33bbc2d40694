"""The kernels as custom ops, under torch.compile, and inside the model: training with
`model.kernels: triton` (fused bias-dropout-add and LayerNorm residual included) matches
`model.kernels: torch`; with hidden dropout it replays under recomputation and trains; `auto`
falls back for attention dropout."""

import collections
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from starcoder.config import ModelConfig
from starcoder.kernels import (
    apply_rope,
    bias_dropout_add,
    bias_gelu,
    cross_entropy,
    flash_attention,
    layer_norm,
    linear_cross_entropy,
)
from starcoder.kernels.flash_attention import document_table
from starcoder.models import GPT, init_weights
from starcoder.models.attention import attention, attention_backend, resolve_backend
from starcoder.models.ops import rotary_tables
from tests.kernels.checks import DEVICE


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    return g, r


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration of every op."""
    g, r = _inputs(0)
    q, k, v = r(1, 20, 2, 32), r(1, 20, 1, 32), r(1, 20, 1, 32)
    x, w, b = r(3, 40), r(40), r(40)
    labels = torch.randint(0, 70, (6,), generator=g).to(DEVICE)
    cos, sin = rotary_tables(20, 32, 10000.0, DEVICE)
    seed = torch.tensor([12345], device=DEVICE)
    cases = [
        (torch.ops.starcoder.flash_attention_forward, (q, k, v, None, True, 7, 0.2)),
        (torch.ops.starcoder.flash_attention_forward,
         (q, k, v, document_table(torch.tensor([[0] * 5 + [1] * 9 + [2] * 6], device=DEVICE)),
          True, None, 0.2)),
        (torch.ops.starcoder.layer_norm_forward, (x, w, b, r(3, 40), 1e-5)),
        (torch.ops.starcoder.layer_norm_forward, (x, w, b, None, 1e-5)),
        (torch.ops.starcoder.bias_gelu_forward, (x, b)),
        (torch.ops.starcoder.bias_dropout_add_forward, (x, b, r(3, 40), seed, 0.0)),
        (torch.ops.starcoder.bias_dropout_add_forward, (x, b, r(3, 40), seed, 0.3)),
        (torch.ops.starcoder.rope, (q, k, cos, sin, False)),
        (torch.ops.starcoder.cross_entropy, (r(6, 70), labels, False)),
        (torch.ops.starcoder.cross_entropy_shard_stats, (r(6, 70), labels, 0)),
        (torch.ops.starcoder.linear_cross_entropy_forward, (r(6, 16), r(70, 16), labels, 4)),
    ]
    for op, args in cases:
        args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                and a is not cos and a is not sin else a for a in args]
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_autograd_registration"))


def test_compiles_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward."""
    g, r = _inputs(1)
    q = r(1, 18, 2, 32).requires_grad_()
    kv = r(1, 18, 1, 2, 32).requires_grad_()
    w, b = r(64).requires_grad_(), r(64).requires_grad_()
    head = r(50, 64).requires_grad_()
    labels = torch.randint(0, 50, (1, 18), generator=g).to(DEVICE)
    cos, sin = rotary_tables(18, 32, 10000.0, DEVICE)
    documents = torch.tensor([[0] * 7 + [1] + [2] * 10], device=DEVICE)
    seed = torch.tensor([7], device=DEVICE)

    def step(q, kv, w, b, head):
        k, v = kv.unbind(3)
        q, k = apply_rope(q, k, cos, sin)
        h = flash_attention(q, k, v, window=5, document_ids=documents).reshape(1, 18, 64)
        h = bias_dropout_add(h, b, q.reshape(1, 18, 64), 0.2, seed)
        h = layer_norm(bias_gelu(h, b), w, b, 1e-5)
        return (linear_cross_entropy(h, head, labels) + cross_entropy(h @ head.t(), labels)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    args = (q, kv, w, b, head)
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    loss_eager = step(*args)
    grads_eager = torch.autograd.grad(loss_eager, args)
    torch.testing.assert_close(loss, loss_eager)
    for a, e in zip(grads, grads_eager):
        torch.testing.assert_close(a, e)


MICRO = dict(num_layers=2, hidden_size=64, num_attention_heads=2, ffn_hidden_size=128,
             vocab_size=96, max_position_embeddings=32)
STARCODER2 = dict(architecture="starcoder2", num_query_groups=1, position_embedding="rope",
                  sliding_window=8)


def _micro_batch(cfg):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 21), generator=g).to(DEVICE)
    labels = tokens[:, 1:].clone()
    labels[0, :4] = -100
    return tokens, labels


@pytest.mark.parametrize("arch", [
    STARCODER2, dict(architecture="gpt_bigcode", num_query_groups=1, position_embedding="learned"),
], ids=["starcoder2-rope-window", "starcoder-mqa-learned"])
def test_micro_model_trains_the_same_with_triton_kernels(arch):
    """A few AdamW steps of a micro model: Triton kernels (interpreted on CPU) vs PyTorch ops.
    Without hidden dropout the Triton blocks add the attention residual inside the MLP's
    LayerNorm and the MLP's bias and residual in the bias-dropout-add kernel."""
    cfg = ModelConfig(**MICRO, **arch)
    tokens, labels = _micro_batch(cfg)
    losses = {}
    for kernels in ("torch", "triton"):
        model = GPT(cfg).to(DEVICE)
        init_weights(model, cfg, seed=5)
        model.set_kernels(kernels)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        losses[kernels] = []
        for _ in range(3):  # one batch, learned a little more each step
            per_token = model(tokens[:, :-1], labels)
            loss = per_token.sum() / (labels != -100).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[kernels].append(loss.item())
        losses[kernels + "_params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert losses["torch"][-1] < losses["torch"][0] - 0.05  # it does train
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]),
                               rtol=1e-5, atol=1e-5)
    # Adam divides by sqrt(v): where a gradient is ~0, rounding noise moves the weight by up to
    # lr per step, so parameters get an absolute tolerance well under lr (3e-3).
    torch.testing.assert_close(losses["triton_params"], losses["torch_params"], rtol=1e-4, atol=2e-4)


def test_auto_falls_back_for_attention_dropout(caplog, monkeypatch):
    monkeypatch.setattr("starcoder.models.attention._triton_available", lambda: True)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "auto"
    assert attention_backend("auto", "cuda", 0.0) == "triton"
    with caplog.at_level(logging.WARNING, logger="starcoder.models.attention"):
        assert attention_backend("auto", "cuda", 0.1) == "torch"
    assert "attention dropout is 0.1" in caplog.text
    assert attention_backend("auto", "cpu", 0.0) == "torch"
    assert attention_backend("triton", "cpu", 0.1) == "triton"  # explicit: the seam raises


def test_explicit_triton_with_dropout_is_a_clear_error():
    q = torch.zeros(1, 8, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="attention_dropout"):
        attention(q, q, q, dropout_p=0.1, backend="triton")


def test_micro_model_with_fused_hidden_dropout_replays_and_trains():
    """hidden_dropout > 0 on the Triton path (bias-dropout-add after attention and MLP): its masks
    come from torch's generator, so full recomputation replays them exactly, and training with
    them stays finite and learns."""
    micro = dict(MICRO, num_layers=1)
    tokens, labels = _micro_batch(ModelConfig(**micro, **STARCODER2))
    tokens_used = (labels != -100).sum()
    grads, models, losses = {}, {}, []
    for recompute in ("full", "none"):
        cfg = ModelConfig(**micro, **STARCODER2, hidden_dropout=0.2, recompute=recompute)
        model = models[recompute] = GPT(cfg).to(DEVICE)
        init_weights(model, cfg, seed=5)
        model.set_kernels("triton")
        torch.manual_seed(0)
        loss = model(tokens[:, :-1], labels).sum() / tokens_used
        loss.backward()
        grads[recompute] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["none"], grads["full"]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

    model = models["none"]
    with torch.no_grad():
        assert model.eval()(tokens[:, :-1], labels).sum() / tokens_used != loss  # it dropped out
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt.step()  # with the gradients above
    losses = [loss.item(), (model(tokens[:, :-1], labels).sum() / tokens_used).item()]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]


class _CountCustomOps(TorchDispatchMode):
    """Counts calls of starcoder custom ops (with a residual, for LayerNorm)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name == "starcoder::layer_norm_forward" and args[3] is not None:
            name += " (residual)"
        self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("hidden_dropout,training", [(0.0, True), (0.2, False), (0.2, True)])
def test_triton_blocks_fuse_their_residual_adds(hidden_dropout, training):
    """Without active dropout each block adds the attention residual in the MLP's LayerNorm and
    the MLP's in bias-dropout-add; with dropout both go through bias-dropout-add."""
    cfg = ModelConfig(**dict(MICRO, num_layers=1), **STARCODER2, hidden_dropout=hidden_dropout)
    model = GPT(cfg).to(DEVICE).train(training)
    model.set_kernels("triton")
    tokens, labels = _micro_batch(cfg)
    with _CountCustomOps() as mode:
        model(tokens[:, :-1], labels)
    dropping = training and hidden_dropout > 0
    layers = cfg.num_layers
    assert mode.counts["starcoder::bias_dropout_add_forward"] == (2 if dropping else 1) * layers
    assert mode.counts["starcoder::layer_norm_forward (residual)"] == (0 if dropping else layers)
