"""Parameter and FLOP accounting (for `starcoder info` and MFU)."""

from __future__ import annotations

import torch

from starcoder.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model as released: built on the meta device, tied weights counted once,
    padded vocabulary rows left out (so counts equal the matching `transformers` model's)."""
    from starcoder.models.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates
    padded_rows = model.padded_vocab_size - cfg.vocab_size
    matrices = 1 if cfg.tie_word_embeddings else 2
    return total - padded_rows * cfg.hidden_size * matrices


def average_keys_per_query(seq_length: int, window: int | None) -> float:
    """Mean number of keys a query attends to under a causal (optionally windowed) mask."""
    s = seq_length
    if window is None or window >= s:
        return (s + 1) / 2
    # queries 0..W-1 see i+1 keys, the rest see W
    return (window * (window + 1) / 2 + (s - window) * window) / s


def model_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward, no recomputation: this gives MFU, not HFU).

    6N, with N excluding the input and position embeddings but counting the output layer once,
    plus attention: 12 x layers x q_heads x head_dim x average keys per query.
    """
    n = count_parameters(cfg)
    if cfg.position_embedding == "learned":
        n -= cfg.max_position_embeddings * cfg.hidden_size
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size  # the input embedding; the head stays
    keys = average_keys_per_query(seq_length, cfg.sliding_window)
    attn = 12 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * keys
    return 6 * n + attn
