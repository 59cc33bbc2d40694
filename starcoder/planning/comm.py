"""Bytes each rank sends per training step, by process group, from a config alone.

Ring model, as in `starcoder.parallel.comm_accounting` (the distributed-optimizer work, which
measures the same quantities by hooking the collectives): all-reduce sends 2(n-1)/n x B,
all-gather and reduce-scatter (n-1)/n x B, a pipeline send B, for a tensor of B bytes.
"""

from __future__ import annotations

from starcoder.config import Config
from starcoder.planning.parameters import BYTES, parameters_per_rank, recomputed_layers, stage_layers


def _ring(kind: str, n: int, nbytes: float) -> float:
    if n == 1:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * nbytes


def comm_bytes(cfg: Config, dp: int, accumulation: int) -> dict[str, int]:
    """{"tp": ..., "dp": ..., "pp": ...} bytes sent per rank per step (the busiest stage)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    precision = "bf16" if t.precision == "auto" else t.precision
    e = BYTES[precision]
    layers = max(stage_layers(cfg))
    activation = t.micro_batch_size * t.seq_length * m.hidden_size * e  # one [b, s, h] tensor
    # Per block: attention and MLP each enter and leave a TP region, forward and backward:
    # SP: all-gather + reduce-scatter each way, and backward gathers the two saved input shards
    # again (comm_accounting.tp_micro_batch_bytes); otherwise one all-reduce each way.
    ag, rs, ar = (_ring(kind, tp, activation) for kind in ("all_gather", "reduce_scatter", "all_reduce"))
    forward, backward = (2 * (ag + rs), 4 * ag + 2 * rs) if p.sequence_parallel else (2 * ar, 2 * ar)
    # A recomputed forward repeats the forward's collectives: full recompute in its recomputed
    # blocks, selective in every block (starcoder.models.recompute cannot keep their outputs).
    replayed = layers if m.recompute == "selective" else max(recomputed_layers(cfg))
    tp_bytes = accumulation * (layers * (forward + backward) + replayed * forward)
    n = parameters_per_rank(m, tp, layers, pp == 1, True, pp)
    grad_bytes = 4 if precision == "fp32" or getattr(p, "grad_reduce_in_fp32", True) else 2
    if p.distributed_optimizer:
        dp_bytes = _ring("reduce_scatter", dp, n * grad_bytes) + _ring("all_gather", dp, n * e)
    else:
        dp_bytes = _ring("all_reduce", dp, n * grad_bytes)
    boundary = activation // (tp if p.sequence_parallel else 1)
    pp_bytes = 2 * accumulation * boundary * getattr(p, "virtual_pipeline", 1) if pp > 1 else 0
    return {"tp": int(tp_bytes), "dp": int(dp_bytes), "pp": int(pp_bytes)}
