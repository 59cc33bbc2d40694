"""The KV cache gives the logits of a full forward, for every attention layout."""

import pytest
import torch

from starcoder.config import load_config
from starcoder.generation import KVCache, Sampling, generate_ids
from starcoder.models.gpt import GPT
from starcoder.models.init import init_weights

LAYOUTS = {
    "mqa-learned": ("tiny-sc1", []),
    "mha-learned": ("tiny-sc1", ["model.num_query_groups=8"]),
    "gqa-rope": ("tiny-sc2", ["model.sliding_window=null"]),
    "gqa-rope-window": ("tiny-sc2", ["model.sliding_window=8"]),  # shorter than the sequence
}


def tiny(preset, overrides):
    cfg = load_config(preset, ["model.num_layers=2", "model.hidden_size=64", "model.vocab_size=512",
                               "model.ffn_hidden_size=128", "model.max_position_embeddings=64",
                               "train.seq_length=64", *overrides])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    init_weights(model, cfg.model, 0)
    return model.eval()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_prefill_then_decode_matches_full_forward(layout):
    model = tiny(*LAYOUTS[layout])
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(torch.zeros(2, dtype=torch.long), capacity=30, window=model.cfg.sliding_window)
        chunks = [model(ids[:, :12], cache=cache)]
        cache.advance(12)
        for t in range(12, 30):  # one token at a time; with window 8 the buffer rolls over
            chunks.append(model(ids[:, t: t + 1], cache=cache))
            cache.advance(1)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    if model.cfg.sliding_window:
        assert cache.layers["0"].k.shape[1] == model.cfg.sliding_window  # a rolling buffer of W


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cache_holds_only_kv_heads(layout):
    model = tiny(*LAYOUTS[layout])
    cache = KVCache(torch.zeros(1, dtype=torch.long), capacity=40, window=model.cfg.sliding_window)
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    k = cache.layers["0"].k
    assert k.shape[2] == model.cfg.num_query_groups and k.shape[3] == model.cfg.head_dim


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_batched_prompts_of_different_lengths_equal_one_by_one(layout):
    model = tiny(*LAYOUTS[layout])
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (3, 17, 9)]
    budgets = [20, 12, 16]
    for sampling in (Sampling(), Sampling(temperature=0.8, top_p=0.9, top_k=50, seed=3)):
        batched = generate_ids(model, prompts, budgets, set(), sampling)
        if sampling.greedy:  # sampled rows draw from one generator: only greedy is per-row
            alone = [generate_ids(model, [p], [n], set(), sampling)[0] for p, n in zip(prompts, budgets)]
            assert batched == alone
        assert [len(b) for b in batched] == budgets
        assert generate_ids(model, prompts, budgets, set(), sampling, use_cache=False) == batched


def test_stop_ids_end_a_row_and_are_kept():
    model = tiny(*LAYOUTS["gqa-rope"])
    free = generate_ids(model, [[5, 6, 7]], [10], set())[0]
    stop = free[3]
    assert generate_ids(model, [[5, 6, 7]], [10], {stop})[0] == free[: free.index(stop) + 1]
