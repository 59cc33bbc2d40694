"""Generation under tensor parallelism 2 gives the tokens of one process (one 2-rank gloo world)."""

import pytest

from starcoder.generation import Sampling, load_generator
from tests.distributed import World

PROMPTS = ["def add(a, b):\n    return", "import os\n"]
SAMPLED = Sampling(temperature=0.9, top_p=0.9, top_k=40, seed=5)


@pytest.fixture(scope="module")
def world():
    with World(2) as w:
        yield w


def _generate(path: str, tensor_parallel: int):
    import torch

    torch.set_num_threads(1)
    gen = load_generator(path, tensor_parallel=tensor_parallel)
    greedy = gen.complete(PROMPTS, max_new_tokens=70)
    sampled = gen.complete(PROMPTS, max_new_tokens=20, sampling=SAMPLED)
    local_heads = gen.model.blocks["0"].attn.q_proj.weight.shape[0] // gen.model.cfg.head_dim
    return [c.tokens for c in greedy], [c.tokens for c in sampled], local_heads


@pytest.mark.parametrize("family", ["sc1", "sc2"])
def test_tp2_generates_the_tokens_of_one_process(world, tiny_models, family, one_thread):
    path = str(tiny_models[family]["native"])
    expected = _generate(path, 1)
    for rank_result in world.run(_generate, path, 2):
        greedy, sampled, local_heads = rank_result
        assert local_heads == expected[2] // 2  # really sharded
        assert greedy == expected[0]
        assert sampled == expected[1]
