"""Rank the layouts that fit on N nodes by a roofline step time (docs/plan.md states the model).

step = compute x (1 + bubble) + TP time + PP time + DP time, where
- compute = training FLOPs of the rank's tokens (6N + attention, x 4/3 in the blocks full
  recompute recomputes; selective recomputes no GEMM) at `gemm_efficiency` of the GPU's peak;
- bubble = (PP - 1) / (micro-batches x virtual chunks) (1F1B / interleaved);
- TP collectives run exposed at the NVLink bandwidth when TP fits in a node, else at the
  network bandwidth; PP sends and DP reductions use the link their group spans, DP
  reductions count in full (no overlap credit: the ranking is conservative for large DP).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from starcoder.config import Config, ConfigError, accumulation_steps
from starcoder.models.flops import model_flops_per_token
from starcoder.planning.memory import GiB, Plan, plan_layout
from starcoder.planning.parameters import recomputed_layers


@dataclass
class Hardware:
    peak_tflops: float = 989.0  # dense bf16, H100 SXM
    gemm_efficiency: float = 0.5  # fraction of peak the GEMMs reach
    nvlink_gbps: float = 450.0  # GB/s per GPU per direction inside a node
    network_gbps: float = 50.0  # GB/s per GPU across nodes (400 Gb/s InfiniBand per GPU)


def step_time(cfg: Config, plan: Plan, gpus_per_node: int, hw: Hardware) -> float:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, dp = p.tensor_parallel, p.pipeline_parallel, plan.layout["data_parallel"]
    accumulation = accumulation_steps(t, dp)
    tokens_per_rank = t.global_batch_size * t.seq_length / dp
    flops = model_flops_per_token(m, t.seq_length) * tokens_per_rank / (tp * pp)
    flops *= 1 + sum(recomputed_layers(cfg)) / m.num_layers / 3
    compute = flops / (hw.peak_tflops * 1e12 * hw.gemm_efficiency)
    bubble = (pp - 1) / (accumulation * getattr(p, "virtual_pipeline", 1))

    def link(span: int) -> float:
        return (hw.nvlink_gbps if span <= gpus_per_node else hw.network_gbps) * 1e9
    comm = plan.comm
    return (compute * (1 + bubble) + comm["tp"] / link(tp) + comm["pp"] / link(tp * pp)
            + comm["dp"] / link(tp * pp * dp))


def rank_layouts(cfg: Config, nodes: int, gpus_per_node: int = 8, gpu_memory: int = 80 * GiB,
                 hw: Hardware | None = None) -> list[Plan]:
    """Every valid TP x PP x DP split of nodes x gpus_per_node GPUs (TP within a node, sequence
    parallel on when TP > 1), the fitting ones first, each group fastest first."""
    hw = hw or Hardware(peak_tflops=cfg.log.peak_tflops or Hardware.peak_tflops)
    world = nodes * gpus_per_node
    plans = []
    for tp in (d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0):
        for pp in (d for d in range(1, world // tp + 1) if (world // tp) % d == 0):
            candidate = copy.deepcopy(cfg)
            par = candidate.parallel
            par.tensor_parallel, par.pipeline_parallel, par.sequence_parallel = tp, pp, tp > 1
            if hasattr(par, "pipeline_layers"):
                par.pipeline_layers = None
            if getattr(par, "virtual_pipeline", 1) > 1 and pp == 1:
                par.virtual_pipeline = 1
            try:
                candidate.validate()
                plan = plan_layout(candidate, nodes, gpus_per_node, gpu_memory)
            except ConfigError:
                continue  # this split does not divide the heads, layers or batch
            plan.step_time_s = step_time(candidate, plan, gpus_per_node, hw)
            plans.append(plan)
    return sorted(plans, key=lambda pl: (not pl.fits, pl.step_time_s))
