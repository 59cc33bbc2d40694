"""Generation under tensor parallelism 2 gives the tokens of one process, and the ranks share a
step folder's checksumming and its verdict (one 2-rank gloo world)."""

import pytest

from starcoder.config import UserError
from starcoder.convert.checkpoints import latest_checkpoint, read_manifest
from starcoder.generation import Sampling, load_generator
from starcoder.training.trainer import train
from tests.distributed import World
from tests.training.helpers import checksummed_files, corrupt_copy, make_corpus, tiny_config

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


def _load_counting(step):
    """The files of `step` this rank checksummed while loading it at TP 2, or the error."""
    with checksummed_files(step) as read:
        try:
            load_generator(step, tensor_parallel=2)
        except UserError as err:
            return str(err)
    return read


def test_tp2_ranks_share_a_step_folders_checksums_and_its_verdict(world, tmp_path, one_thread):
    run = tmp_path / "run"
    train(tiny_config(make_corpus(tmp_path / "corpus", files=2), run, "train.max_steps=1"))
    step = latest_checkpoint(run)
    read = world.run(_load_counting, step)
    assert sorted(read[0] + read[1]) == sorted(read_manifest(step)["files"])  # once between them
    assert read[0] and read[1]

    corrupt = corrupt_copy(step, tmp_path / "corrupt")
    errors = world.run(_load_counting, corrupt)
    assert errors[0] == errors[1] and errors[0].startswith(f"--model: {corrupt}: corrupt checkpoint: ")
