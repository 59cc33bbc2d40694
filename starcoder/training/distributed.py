"""Joining and leaving the process group of a `torchrun` or `srun` launch.

Under `srun` without torchrun, each task maps SLURM's variables to torchrun's (RANK, WORLD_SIZE,
LOCAL_RANK); MASTER_ADDR/MASTER_PORT come from the sbatch script (see tools/train.sbatch).

Leaving follows ../shared/reference/torch-distributed-cpu.md: a gloo worker thread still alive
at interpreter exit can abort a finished process (pytorch#190489), so after destroying the group
we collect garbage and pause briefly before returning.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from starcoder.config import Config, ConfigError
from starcoder.parallel.grid import default_backend


def launched_by_srun() -> bool:
    """A task of a multi-task `srun` step that torchrun did not start."""
    return "RANK" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def world_from_environment() -> int:
    if launched_by_srun():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("MASTER_ADDR: not set; under srun the batch script must export the "
                              "first node's address (see tools/train.sbatch)")
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29500")
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(requested: str) -> torch.device:
    """`train.device` for this process: GPU LOCAL_RANK (modulo the visible GPUs), or the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda was asked for but no GPU is visible")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextlib.contextmanager
def distributed_session(cfg: Config):
    """Initialise the default process group for a multi-process launch (no-op for one process,
    or when a group already exists), and tear it down safely afterwards."""
    world = world_from_environment()
    device = resolve_device(cfg.train.device)
    if world <= 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(default_backend(cfg.parallel, device),
                            timeout=timedelta(seconds=cfg.parallel.collective_timeout_s))
    try:
        yield
    finally:
        gc.collect()  # drop meshes, DDP and optimizers holding the groups first
        dist.destroy_process_group()
        gc.collect()
        time.sleep(0.2)
