"""Bytes per GPU of one layout, term by term (formulas: docs/plan.md).

Parameters are counted exactly from the sharding `parallelize` applies. Weights, gradients, main
weights and optimizer state follow the Megatron-style mixed-precision layout (bf16 weights, fp32
main weights and Adam moments, fp32 gradient accumulation unless `parallel.grad_reduce_in_fp32`
is false; the distributed optimizer shards the fp32 state over DP). Activations are the tensors
one block saves for backward, listed per tensor in `activation_tensors` and checked against
saved-tensor hooks in tests/planning. Keys from the pipeline and mixed-precision work are read
with their documented defaults, so the planner runs on configs with or without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starcoder.config import Config, ConfigError, ModelConfig, accumulation_steps
from starcoder.models.attention import check_window_dropout
from starcoder.planning.comm import comm_bytes
from starcoder.planning.parameters import BYTES, parameters_per_rank, recomputed_layers, stage_layers

GiB = 2 ** 30
# CUDA context, NCCL buffers and allocator fragmentation: a flat allowance (see docs/plan.md).
WORKSPACE_BYTES = 3 * GiB


@dataclass
class Plan:
    """Per-GPU memory of one layout: `terms` in bytes, their `total`, the `dominant` term."""
    layout: dict[str, int]
    terms: dict[str, int]
    gpu_memory: int
    comm: dict[str, int] = field(default_factory=dict)  # bytes sent per rank per step, by group
    notes: list[str] = field(default_factory=list)
    step_time_s: float | None = None

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def dominant(self) -> str:
        return max(self.terms, key=self.terms.get)

    def to_json(self) -> dict:
        return {"fits": self.fits, "total": self.total, "gpu_memory": self.gpu_memory,
                "dominant": self.dominant, "layout": self.layout, "terms": dict(self.terms),
                "comm_bytes_per_step": dict(self.comm), "step_time_s": self.step_time_s,
                "notes": list(self.notes)}


def activation_tensors(m: ModelConfig, tp: int, sp: bool, micro_batch: int, seq: int,
                       dtype_bytes: int, recompute: str, attention_path: str = "flash"
                       ) -> dict[str, int]:
    """Bytes one block saves for backward per micro-batch on one TP rank, by tensor.

    `attention_path`: `flash` (the Triton kernel, or SDPA's flash kernels: q, k, v, the output and
    an fp32 log-sum-exp per query), `flex` (compiled FlexAttention, CUDA's windowed fallback: the
    same), `sdpa-mask` (CPU SDPA's flash kernel with a window mask: the same plus an [s, s]
    additive mask per call) or `math` (SDPA's math kernel, which CUDA SDPA with a mask and GQA
    would take, and the model avoids: the [heads, s, s] probabilities are saved, and K/V are
    expanded to the query heads).
    """
    e, b, s, h = dtype_bytes, micro_batch, seq, m.hidden_size
    d, f = m.head_dim, m.ffn_size
    heads = m.num_attention_heads // tp
    kv_heads = max(m.num_query_groups // tp, 1)
    tokens = b * s  # tokens in a tensor-parallel region
    local = tokens // tp if sp else tokens  # tokens in the LayerNorm / residual region
    if recompute == "full":
        return {"block input": local * h * e}
    if recompute == "selective":
        return _selective_tensors(m, tp, micro_batch, seq, dtype_bytes, local, attention_path)
    t: dict[str, int] = {}
    t["attn_norm input"] = local * h * e
    t["attn_norm mean, rstd"] = 2 * local * 4
    t["q/kv input"] = local * h * e  # SP: the shard, gathered again in backward (one for q and kv)
    # v is a view of kv_proj's output, which therefore stays whole; RoPE makes k a new tensor.
    qkv = tokens * (heads + 2 * kv_heads + (kv_heads if m.position_embedding == "rope" else 0)) * d * e
    t["attention q, k, v"] = qkv
    if attention_path in ("flash", "flex", "sdpa-mask"):
        t["attention output"] = tokens * heads * d * e
        t["attention log-sum-exp"] = tokens * heads * 4
        if attention_path == "sdpa-mask":  # SDPA turns the boolean mask into an additive one
            t["attention mask"] = s * s * e
    else:
        t["attention k, v expanded"] = 2 * tokens * heads * d * e if kv_heads < heads else 0
        t["attention probabilities"] = b * heads * s * s * e
        t["attention output"] = tokens * heads * d * e
    t["mlp_norm input"] = local * h * e
    t["mlp_norm mean, rstd"] = 2 * local * 4
    t["fc_in input"] = local * h * e  # SP: the shard, as for q/kv
    t["gelu input"] = tokens * f // tp * e
    t["fc_out input"] = tokens * f // tp * e
    if m.hidden_dropout > 0:
        t["dropout masks"] = 2 * local * h  # one byte per element
    if m.attention_dropout > 0:
        t["attention dropout mask"] = b * heads * s * s if attention_path == "math" else 0
    return {k: v for k, v in t.items() if v}


def _selective_tensors(m: ModelConfig, tp: int, micro_batch: int, seq: int, e: int, local: int,
                       attention_path: str) -> dict[str, int]:
    """`recompute: selective` (starcoder.models.recompute): the checkpoint keeps the block input
    and the outputs of the GEMMs and of attention; everything else is recomputed. The output
    projections' GEMM outputs are the partial sums before the TP reduction: whole sequence."""
    b, s, h, d = micro_batch, seq, m.hidden_size, m.head_dim
    heads = m.num_attention_heads // tp
    kv_heads = max(m.num_query_groups // tp, 1)
    tokens = b * s
    t = {"block input": local * h * e,
         "q_proj output": tokens * heads * d * e,
         "kv_proj output": tokens * 2 * kv_heads * d * e}
    if attention_path in ("flash", "flex", "sdpa-mask"):
        t["attention output"] = tokens * heads * d * e
        t["attention log-sum-exp"] = tokens * heads * 4
    else:  # SDPA's math path: its two bmm outputs (scores; output); the softmax is recomputed
        t["attention scores"] = b * heads * s * s * e
        t["attention output"] = tokens * heads * d * e
    t["out_proj output"] = tokens * h * e
    t["fc_in output"] = tokens * m.ffn_size // tp * e
    t["fc_out output"] = tokens * h * e
    return t


def attention_path(cfg: Config) -> str:
    """Which attention a GPU run takes (docs/kernels.md): the Triton flash kernel, SDPA's flash
    kernels where no mask is needed, or, for a window without the Triton kernel (`kernels: torch`,
    or attention dropout), compiled FlexAttention, which saves what flash does. A window with
    attention dropout there is refused at start-up, and so here."""
    m = cfg.model
    check_window_dropout(m, cfg.train.seq_length, "cuda")
    triton = m.kernels != "torch" and m.attention_dropout == 0
    windowed = m.sliding_window is not None and m.sliding_window < cfg.train.seq_length
    return "flash" if triton or not windowed else "flex"


def in_flight(cfg: Config, accumulation: int) -> float:
    """Micro-batches' worth of stage activations the first pipeline stage holds at its peak."""
    p = cfg.parallel
    pp, v = p.pipeline_parallel, getattr(p, "virtual_pipeline", 1)
    schedule = getattr(p, "pipeline_schedule", "auto")
    if schedule == "auto":
        schedule = "interleaved" if v > 1 else "1f1b"
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return accumulation
    if schedule == "interleaved":
        # Megatron's warm-up on rank 0: 2(P-1) + (V-1)P + 1 chunk forwards, a chunk is 1/V of the stage.
        return min(accumulation * v, 2 * (pp - 1) + (v - 1) * pp + 1) / v
    return min(pp, accumulation)  # 1f1b and zero_bubble (ZB-V keeps 1F1B's peak)


def plan_layout(cfg: Config, nodes: int | None = None, gpus_per_node: int = 8,
                gpu_memory: int = 80 * GiB) -> Plan:
    """Per-GPU memory of `cfg`'s layout. With `nodes`, DP = nodes x gpus_per_node / (TP x PP);
    without, DP = 1 (the distributed optimizer then shards nothing: the worst case)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    dp = 1
    if nodes is not None:
        world = nodes * gpus_per_node
        if world % (tp * pp):
            raise ConfigError(f"parallel.tensor_parallel: {tp} x pipeline {pp} does not divide "
                              f"{world} GPUs ({nodes} nodes x {gpus_per_node})")
        dp = world // (tp * pp)
    accumulation = accumulation_steps(t, dp)
    precision = "bf16" if t.precision == "auto" else t.precision
    e = BYTES[precision]
    layers, recomputed = stage_layers(cfg), recomputed_layers(cfg)
    flight = in_flight(cfg, accumulation)
    path = attention_path(cfg)
    worst: Plan | None = None
    for rank, count in enumerate(layers):
        first, last = rank == 0, rank == pp - 1
        n = parameters_per_rank(m, tp, count, first, last, pp)
        shard = dp if p.distributed_optimizer else 1
        terms = {"weights": n * e}
        if precision == "fp32":
            terms |= {"gradients": 4 * n, "main_weights": 0, "optimizer": 8 * n // shard}
        elif getattr(p, "grad_reduce_in_fp32", True):
            terms |= {"gradients": 4 * n, "main_weights": 4 * n // shard, "optimizer": 8 * n // shard}
        else:
            terms |= {"gradients": 2 * n, "main_weights": 4 * n // shard,
                      "main_gradients": 4 * n // shard, "optimizer": 8 * n // shard}

        def block(mode):
            return sum(activation_tensors(m, tp, p.sequence_parallel, t.micro_batch_size,
                                          t.seq_length, e, mode, path).values())
        # Under recompute_layers the blocks that full recompute skips save everything.
        full = recomputed[rank]
        per_micro = (full * block("full") + (count - full) * block("none") if m.recompute == "full"
                     else count * block(m.recompute))
        terms["activations"] = int(per_micro * flight)
        tokens = t.micro_batch_size * t.seq_length
        vocab = m.padded_vocab_size(tp) // tp
        terms["logits"] = tokens * vocab * (e + 3 * 4) if last else 0
        terms["workspace"] = WORKSPACE_BYTES + block("none")
        layout = {"tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp,
                  "sequence_parallel": int(p.sequence_parallel), "micro_batch_size": t.micro_batch_size,
                  "seq_length": t.seq_length, "stage": rank, "layers_on_stage": count}
        plan = Plan(layout, terms, gpu_memory)
        if worst is None or plan.total > worst.total:
            worst = plan
    worst.comm = comm_bytes(cfg, dp, accumulation)
    worst.notes = [
        f"precision {precision}; attention {path}; recompute {m.recompute}"
        + (f" (full on the first {m.recompute_layers} blocks of each model chunk)"
           if m.recompute == "full" and m.recompute_layers is not None else "")
        + f"; {flight:g} micro-batch(es) of activations in flight on the first stage",
        f"workspace: {WORKSPACE_BYTES // GiB} GiB allowance + one block's backward working set",
    ]
    return worst
