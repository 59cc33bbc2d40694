"""Packing with document masking: examples packed into rows with `document_ids` give what each
gives alone (attention stops at document boundaries, positions restart per document)."""

from types import SimpleNamespace

import pytest
import torch

from starcoder.config import ConfigError, load_config
from starcoder.models import GPT, init_weights
from starcoder.models.attention import attention
from starcoder.models.gpt import document_positions
from starcoder.training.trainer import Trainer
from tests.kernels.checks import DEVICE


def build(name, *overrides):
    # std 0.2: logits far from uniform, so a leak across documents would show.
    cfg = load_config(name, ["model.init_method_std=0.2", *overrides])
    model = GPT(cfg.model).to(DEVICE)
    init_weights(model, cfg.model, seed=0)
    return cfg, model.eval()


def examples(vocab, lengths, seed=0):
    """One token sequence per example: n inputs and their n next-token labels."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n + 1,), generator=g).to(DEVICE) for n in lengths]


def pack(sequences, rows):
    """Rows of examples (indices) -> inputs, labels, document ids [len(rows), seq]."""
    inputs, labels, ids = [], [], []
    for row in rows:
        inputs.append(torch.cat([sequences[i][:-1] for i in row]))
        labels.append(torch.cat([sequences[i][1:] for i in row]))
        ids.append(torch.cat([torch.full((len(sequences[i]) - 1,), d, device=DEVICE)
                              for d, i in enumerate(row)]))
    return torch.stack(inputs), torch.stack(labels), torch.stack(ids)


def assert_within(got, want, tol=1e-5):
    """Within `tol` of the values' scale (max |want|): fp32 matmuls over a packed batch and over
    one short example round differently (different BLAS blockings), ~1e-6 of the scale."""
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def check_packed_equals_alone(model, lengths, rows, vocab):
    sequences = examples(vocab, lengths)
    inputs, labels, ids = pack(sequences, rows)
    with torch.no_grad():
        logits = model(inputs, document_ids=ids)
        losses = model(inputs, labels, document_ids=ids)
        unmasked = model(inputs, labels)
    leaked = 0.0
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(sequences[i]) - 1
            tokens = sequences[i][None]
            with torch.no_grad():
                alone_logits = model(tokens[:, :-1])
                alone_losses = model(tokens[:, :-1], tokens[:, 1:])
            assert_within(logits[r, start:start + n], alone_logits[0])
            assert_within(losses[r, start:start + n], alone_losses[0])
            leaked = max(leaked, (unmasked[r, start:start + n] - alone_losses[0]).abs().max().item())
            start += n
    assert leaked > 1e-2  # without document ids the later examples do see the earlier ones


@pytest.mark.parametrize("name", ["tiny-sc1", "tiny-sc2"])
def test_packed_equals_each_example_alone(name):
    """tiny-sc1: learned positions, MQA; tiny-sc2: RoPE, GQA, window 64 (examples longer than it).
    Documents of length 1, and a row holding one document."""
    cfg, model = build(name)
    lengths = [37, 1, 90, 5, 123, 256]
    check_packed_equals_alone(model, lengths, [[0, 1, 2, 3, 4], [5]], cfg.model.vocab_size)


def test_packed_equals_alone_with_triton_kernels():
    """The same through the Triton kernels (interpreted on CPU, so a smaller tiny-sc2, window 16,
    and a shorter row: the 30-token example crosses the interpreter's 16-token tiles)."""
    cfg, model = build("tiny-sc2", "model.kernels=triton", "model.num_layers=2",
                       "model.hidden_size=128", "model.num_attention_heads=4",
                       "model.ffn_hidden_size=256", "model.vocab_size=96", "model.sliding_window=16")
    check_packed_equals_alone(model, [13, 1, 30], [[0, 1, 2]], cfg.model.vocab_size)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_keeps_the_document_mask(recompute):
    sequences = examples(8192, [20, 1, 43])
    inputs, labels, ids = pack(sequences, [[0, 1, 2]])
    grads = []
    for mode in ("none", recompute):
        _, model = build("tiny-sc2", f"model.recompute={mode}", "model.sliding_window=16")
        model.train()
        model(inputs, labels, document_ids=ids).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_document_mask_is_each_document_alone(window):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 15, 4, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 15, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    ids = torch.tensor([[0] * 6 + [1] + [4] * 8], device=DEVICE)
    packed = attention(q, k, v, window=window, document_ids=ids)
    alone = torch.cat([attention(q[:, a:b], k[:, a:b], v[:, a:b], window=window)
                       for a, b in ((0, 6), (6, 7), (7, 15))], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=1e-6)


def test_positions_restart_per_document():
    ids = torch.tensor([[3, 3, 3, 4, 7, 7], [0, 0, 0, 0, 0, 0]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 2, 3, 4, 5]]


def test_bad_document_ids_are_named():
    _, model = build("tiny-sc1", "model.num_layers=1")
    ids = torch.zeros(1, 8, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="document_ids"):
        model(ids, document_ids=ids[:, :7])


def test_pipeline_parallel_refuses_document_ids():
    tokens = torch.zeros(1, 9, dtype=torch.long)
    micro_batch = {"tokens": tokens, "loss_mask": torch.ones(1, 8), "document_ids": tokens}
    with pytest.raises(ConfigError, match="data.document_mask: not available under pipeline"):
        Trainer._pipeline_batch(SimpleNamespace(device=torch.device("cpu")), [micro_batch])
