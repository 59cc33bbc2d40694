"""The model itself: attention semantics, padding invariance, init, recomputation."""

import math

import pytest
import torch

from starcoder.config import load_config
from starcoder.models import GPT, init_weights
from starcoder.models.attention import attention
from starcoder.models.flops import average_keys_per_query


def naive_attention(q, k, v, window=None):
    """Explicit softmax over an explicit mask, K/V repeated per query group."""
    b, s, hq, d = q.shape
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & ((i - j) < (window or s + 1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("window", [None, 1, 5, 37, 64])
def test_attention_matches_explicit_mask(kv_heads, window):
    torch.manual_seed(0)
    q = torch.randn(2, 37, 8, 16)
    k, v = torch.randn(2, 37, kv_heads, 16), torch.randn(2, 37, kv_heads, 16)
    got = attention(q, k, v, causal=True, window=window)
    torch.testing.assert_close(got, naive_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_window_of_one_sees_only_itself():
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    torch.testing.assert_close(attention(q, k, v, window=1), v.expand(-1, -1, 2, -1))


def build(name, *overrides, seed=0):
    cfg = load_config(name, list(overrides))
    model = GPT(cfg.model)
    init_weights(model, cfg.model, seed)
    return cfg, model.eval()


@pytest.mark.parametrize("name", ["tiny-sc1", "tiny-sc2"])
def test_logits_and_losses(name):
    cfg, model = build(name)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32))
    logits = model(ids)
    assert logits.shape == (2, 32, cfg.model.vocab_size)
    losses = model(ids[:, :-1], labels=ids[:, 1:])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(losses.flatten(), ref, atol=1e-5, rtol=1e-5)
    assert abs(losses.mean().item() - math.log(cfg.model.vocab_size)) < 0.5  # near-uniform at init


@pytest.mark.parametrize("name", ["tiny-sc1", "tiny-sc2"])
def test_vocab_padding_never_changes_results(name):
    """Same weights, vocabulary 8001 padded to 8064 vs to 8192 (and garbage in the padded rows)."""
    cfg, small = build(name, "model.vocab_size=8001", "model.make_vocab_size_divisible_by=64")
    assert small.padded_vocab_size == 8064
    big = GPT(cfg.model, padded_vocab_size=8192).eval()
    with torch.no_grad():
        for (name_s, p_s), (name_b, p_b) in zip(small.named_parameters(), big.named_parameters()):
            assert name_s == name_b
            p_b.normal_(std=10.0)  # padded rows hold garbage; must not matter
            p_b[: p_s.shape[0]] = p_s
    ids = torch.randint(0, 8001, (2, 24))
    torch.testing.assert_close(small(ids), big(ids), atol=0, rtol=0)
    assert small(ids).shape[-1] == 8001
    torch.testing.assert_close(small(ids[:, :-1], ids[:, 1:]), big(ids[:, :-1], ids[:, 1:]), atol=0, rtol=0)


def test_window_at_or_above_sequence_is_a_no_op():
    _, windowed = build("tiny-sc2", "model.sliding_window=32")
    _, full = build("tiny-sc2", "model.sliding_window=null")
    _, short = build("tiny-sc2", "model.sliding_window=4")
    ids = torch.randint(0, 8192, (1, 32))
    torch.testing.assert_close(windowed(ids), full(ids), atol=0, rtol=0)
    assert not torch.allclose(short(ids), full(ids))


def test_init_is_megatron_and_seeded_per_parameter():
    cfg, a = build("tiny-sc2", seed=7)
    _, b = build("tiny-sc2", seed=7)
    _, c = build("tiny-sc2", seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("bias"):
            assert not pa.any(), name
        elif "norm" in name:
            assert torch.all(pa == 1), name
        else:
            assert not torch.equal(pa, pc), name
            std = cfg.model.init_method_std
            if name.endswith(("out_proj.weight", "fc_out.weight")):
                std /= math.sqrt(2 * cfg.model.num_layers)
            assert abs(pa.std().item() - std) < 0.1 * std, name
    # the same tensor whatever else the model contains: a 2-layer model shares layers 0-1
    small = GPT(load_config("tiny-sc2", ["model.num_layers=2"]).model)
    init_weights(small, cfg.model, 7)
    assert torch.equal(small.blocks["1"].mlp.fc_in.weight, a.blocks["1"].mlp.fc_in.weight)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_gives_the_same_gradients(mode):
    _, ref = build("tiny-sc2")
    _, rec = build("tiny-sc2", f"model.recompute={mode}")
    ids = torch.randint(0, 8192, (2, 33))
    for model in (ref, rec):
        model.train()
        model(ids[:, :-1], ids[:, 1:]).mean().backward()
    for (name, p), q in zip(ref.named_parameters(), rec.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_untied_output_layer_has_its_own_weight():
    _, model = build("tiny-sc2", "model.tie_word_embeddings=false")
    assert model.head.weight is not None
    assert model.output_weight() is model.head.weight
    _, tied = build("tiny-sc2")
    assert tied.output_weight() is tied.embedding.word.weight


def test_average_keys_per_query():
    assert average_keys_per_query(4, None) == 2.5
    assert average_keys_per_query(4, 2) == (1 + 2 + 2 + 2) / 4
    assert average_keys_per_query(4, 4) == 2.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_tracks_fp32(dtype):
    _, model = build("tiny-sc2")
    ids = torch.randint(0, 8192, (1, 48))
    ref = model(ids)
    half = model.to(dtype)(ids)
    assert half.dtype == dtype
    assert (half.float() - ref).abs().max() < 0.05


def test_queries_align_to_the_last_keys():
    """A decoding step (fewer queries than keys) sees the keys a full pass would give it."""
    q, k, v = torch.randn(1, 10, 4, 8), torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    for window in (None, 3):
        full = attention(q, k, v, window=window)
        torch.testing.assert_close(attention(q[:, -2:], k, v, window=window), full[:, -2:])
