"""Layouts that cannot shard are refused with one line naming the key (no processes needed)."""

from __future__ import annotations

import pytest

from starcoder.config import ConfigError, load_config
from starcoder.models import GPT
from starcoder.parallel import Grid, parallelize
from starcoder.parallel.parallelize import kv_copies


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tensor_parallel=3"],
     "parallel.tensor_parallel: model.num_attention_heads (8) is not divisible by 3"),
    (["parallel.tensor_parallel=8", "model.ffn_hidden_size=1020"],
     "parallel.tensor_parallel: the FFN size (1020) is not divisible by 8"),
    (["parallel.tensor_parallel=2", "model.hidden_size=384", "model.num_attention_heads=6",
      "model.num_query_groups=3"],
     "parallel.tensor_parallel: 2 must divide model.num_query_groups (3) or be a multiple of it"),
    (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "train.seq_length=255"],
     "parallel.sequence_parallel: train.seq_length (255) must be divisible by parallel.tensor_parallel (2)"),
])
def test_unshardable_layouts_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny-sc2", overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_every_tiny_layout_of_the_issue_is_accepted(tp):
    for preset in ("tiny-sc1", "tiny-sc2"):
        load_config(preset, [f"parallel.tensor_parallel={tp}", "parallel.sequence_parallel=true"])


def test_kv_heads_split_or_are_shared_by_blocks_of_ranks():
    assert kv_copies(num_query_groups=1, tp=4) == 4  # MQA: every TP rank holds the KV head
    assert kv_copies(num_query_groups=2, tp=4) == 2  # StarCoder2-3B at TP 4: pairs share a head
    assert kv_copies(num_query_groups=4, tp=2) == 1  # split: 2 KV heads per rank
    with pytest.raises(ConfigError, match=r"^parallel\.tensor_parallel: 2 must divide model\.num_query_groups \(3\)"):
        kv_copies(num_query_groups=3, tp=2)


def test_parallelize_refuses_a_vocabulary_that_does_not_split():
    cfg = load_config("tiny-sc2", ["model.vocab_size=8000", "parallel.tensor_parallel=4"]).model
    model = GPT(cfg, padded_vocab_size=8002)  # 4 ranks cannot split 8002 rows evenly
    with pytest.raises(ValueError, match=r"padded_vocab_size=cfg\.model\.padded_vocab_size\(4\)"):
        parallelize(model, Grid(tp=4))
