"""The process grid, in one place: tensor x data x pipeline groups in Megatron's rank order.

Tensor-parallel ranks are adjacent (they talk most, so they share a node), then data parallel,
then pipeline: global rank = (pp_rank * dp + dp_rank) * tp + tp_rank. Data parallel is whatever
the world size leaves after tensor and pipeline parallel.

With fewer KV heads than tensor-parallel ranks, blocks of adjacent TP ranks hold the same KV heads:
`kv_mesh(copies)` views the tensor dimension as ("kv", "kv_copy") for that case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from starcoder.config import ConfigError, ParallelConfig


@dataclass
class Grid:
    rank: int = 0
    world_size: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1
    mesh: DeviceMesh | None = None  # dims ("pp", "dp", "tp"); None in a single process
    sequence_parallel: bool = False  # only ever true with tp > 1
    _kv_meshes: dict = field(default_factory=dict, repr=False)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def group(self, dim: str):
        """The process group of one grid dimension ("tp", "dp" or "pp"); None in one process."""
        return None if self.mesh is None else self.mesh.get_group(dim)

    def kv_mesh(self, copies: int) -> DeviceMesh:
        """The grid with its tensor dimension split as ("kv", "kv_copy"): tensor rank
        t = kv * copies + kv_copy, so each block of `copies` adjacent TP ranks holds the same KV
        heads. Dims ("pp", "dp", "kv", "kv_copy"). Creating it is collective (all ranks, same
        order); `starcoder.parallel.parallelize` does that, later calls hit the cache."""
        if copies not in self._kv_meshes:
            if self.mesh is None or self.tp % copies:
                raise ValueError(f"cannot split tensor parallel {self.tp} into blocks of {copies}")
            ranks = self.mesh.mesh.reshape(self.pp, self.dp, self.tp // copies, copies)
            self._kv_meshes[copies] = DeviceMesh(self.mesh.device_type, ranks,
                                                 mesh_dim_names=("pp", "dp", "kv", "kv_copy"))
        return self._kv_meshes[copies]


def init_grid(parallel: ParallelConfig, device_type: str = "cpu") -> Grid:
    """Build the grid over the default process group (or a trivial one without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        if parallel.tensor_parallel * parallel.pipeline_parallel != 1:
            key = "tensor_parallel" if parallel.tensor_parallel > 1 else "pipeline_parallel"
            raise ConfigError(f"parallel.{key}: needs a distributed launch "
                              "(torchrun or srun) with at least that many processes")
        return Grid()
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if world % (tp * pp):
        raise ConfigError(f"parallel.tensor_parallel: world size {world} is not divisible by "
                          f"tensor_parallel x pipeline_parallel ({tp} x {pp})")
    dp = world // (tp * pp)
    mesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    return Grid(rank=rank, world_size=world, tp=tp, pp=pp, dp=dp, mesh=mesh,
                sequence_parallel=parallel.sequence_parallel and tp > 1)


def default_backend(parallel: ParallelConfig, device: torch.device) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if device.type == "cuda" else "gloo"

