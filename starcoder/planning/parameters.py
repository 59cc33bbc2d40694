"""Exact parameter counts per rank, from the sharding `parallelize` applies."""

from __future__ import annotations

from starcoder.config import Config, ModelConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def stage_layers(cfg: Config) -> list[int]:
    """Blocks per pipeline stage (model chunks of one rank summed)."""
    return _per_stage(cfg, lambda chunk: chunk)


def recomputed_layers(cfg: Config) -> list[int]:
    """Blocks per pipeline stage that `recompute: full` recomputes: `model.recompute_layers` of
    each model chunk (all of them when null); 0 under other modes."""
    m = cfg.model
    if m.recompute != "full":
        return [0] * cfg.parallel.pipeline_parallel
    n = m.recompute_layers
    return _per_stage(cfg, lambda chunk: chunk if n is None else min(n, chunk))


def _per_stage(cfg: Config, of_chunk) -> list[int]:
    p = cfg.parallel
    pp, v = p.pipeline_parallel, getattr(p, "virtual_pipeline", 1)
    chunks = getattr(p, "pipeline_layers", None) or [cfg.model.num_layers // (pp * v)] * (pp * v)
    # Chunk c runs on rank c % pp (interleaved placement).
    return [sum(of_chunk(chunks[c]) for c in range(rank, pp * v, pp)) for rank in range(pp)]


def parameters_per_rank(m: ModelConfig, tp: int, layers: int, first: bool, last: bool,
                        pp: int = 1) -> int:
    """Parameters one TP rank of a pipeline stage holds (padded vocabulary rows included)."""
    h, f, d, g = m.hidden_size, m.ffn_size, m.head_dim, m.num_query_groups
    q_rows = m.num_attention_heads * d // tp
    kv_rows = 2 * d * g // tp if g % tp == 0 else 2 * d  # KV heads copied when fewer than ranks
    block = ((h + 1) * q_rows + (h + 1) * kv_rows + (q_rows * h + h)  # q, kv, out (+ biases)
             + (h + 1) * (f // tp) + (f // tp * h + h) + 4 * h)  # fc_in, fc_out, two LayerNorms
    vocab_rows = m.padded_vocab_size(tp) // tp
    n = layers * block
    if first:
        n += vocab_rows * h + (m.max_position_embeddings * h if m.position_embedding == "learned" else 0)
    if last:
        n += 2 * h
        if not m.tie_word_embeddings or (pp > 1 and not first):
            n += vocab_rows * h  # untied head, or the last stage's copy of the tied embedding
    return n
