"""The multi-process harness itself: results come back per rank, failures surface with tracebacks."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import World


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("planted")
    return "ok"


def test_world_runs_collectives_and_reports_failures():
    with World(2) as world:
        assert world.run(_sum_of_ranks) == [(0, 1.0), (1, 1.0)]
        with pytest.raises(AssertionError, match="planted"):
            world.run(_fail_on_rank_one)
