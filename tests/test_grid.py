"""The process grid follows Megatron's rank order: tensor fastest, then data, then pipeline."""

import torch.distributed as dist

from starcoder.config import ParallelConfig
from starcoder.parallel.grid import init_grid
from tests.distributed import World


def _coordinates(tp, pp):
    grid = init_grid(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    tp_members = dist.get_process_group_ranks(grid.group("tp"))
    dp_members = dist.get_process_group_ranks(grid.group("dp"))
    return grid.tp_rank, grid.dp_rank, grid.pp_rank, tp_members, dp_members


def test_grid_rank_order():
    with World(4) as world:
        got = world.run(_coordinates, 2, 1)
        assert [g[:3] for g in got] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
        assert got[0][3] == [0, 1] and got[2][3] == [2, 3]
        assert got[0][4] == [0, 2] and got[1][4] == [1, 3]
        got = world.run(_coordinates, 1, 2)
        assert [g[:3] for g in got] == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]
