"""`starcoder info`: architecture, parameters (on the meta device) and FLOPs per token."""

from __future__ import annotations

from starcoder.cli import add_config_arguments
from starcoder.config import load_config
from starcoder.models.flops import count_parameters, model_flops_per_token


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    m, t = cfg.model, cfg.train
    kv = {1: "multi-query"}.get(m.num_query_groups, "multi-head" if m.num_query_groups == m.num_attention_heads
                                else "grouped-query")
    positions = (f"RoPE (theta {m.rope_theta:g})" if m.position_embedding == "rope"
                 else "learned absolute")
    rows = [
        ("architecture", m.architecture),
        ("layers", m.num_layers),
        ("hidden size", m.hidden_size),
        ("attention", f"{m.num_attention_heads} query heads, {m.num_query_groups} KV heads ({kv}), "
                      f"head dim {m.head_dim}"),
        ("sliding window", m.sliding_window or "none"),
        ("FFN size", f"{m.ffn_size} ({m.activation})"),
        ("positions", f"{positions}, {m.max_position_embeddings} max"),
        ("vocabulary", f"{m.vocab_size} (padded to {m.padded_vocab_size(cfg.parallel.tensor_parallel)} "
                       f"at tensor parallel {cfg.parallel.tensor_parallel})"),
        ("output layer", "tied to the embedding" if m.tie_word_embeddings else "untied"),
        ("parallel", f"tensor {cfg.parallel.tensor_parallel}, pipeline {cfg.parallel.pipeline_parallel}, "
                     f"sequence parallel {'on' if cfg.parallel.sequence_parallel else 'off'}"),
        ("train sequence", t.seq_length),
        ("FLOPs per token", f"{model_flops_per_token(m, t.seq_length):.4g} (training, at sequence {t.seq_length})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"parameters: {count_parameters(m)}")
    return 0
