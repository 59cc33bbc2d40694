"""One GPT for StarCoder (GPTBigCode) and StarCoder2, chosen by `ModelConfig`.

Pre-LN decoder: x + attn(ln(x)), then x + mlp(ln(x)), a final LayerNorm and an output layer.
StarCoder: multi-query attention, learned positions, tied output layer. StarCoder2: grouped-query
attention, RoPE, sliding window, tied or untied output layer. Activations are [batch, seq, hidden].

The model is built from parts a pipeline stage can own (`embedding`, `blocks`, `final_norm`,
`head`) and knows nothing about parallelism: `starcoder.parallel.parallelize` swaps its linear
layers, embedding and head for sharded versions with the same interface.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from starcoder.config import ModelConfig
from starcoder.models import ops
from starcoder.models.attention import attention, masked_attention, resolve_backend, uses_triton
from starcoder.models.self_check import Shapes, run_self_checks
from starcoder.models.recompute import run_blocks


class Linear(nn.Linear):
    """nn.Linear that can hand back its bias unapplied, so the caller fuses the add
    (Megatron's `skip_bias_add`)."""

    def forward(self, x: torch.Tensor, return_bias: bool = False):
        if return_bias:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps
        self.backend = "torch"

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """LayerNorm(x), or with `residual` (LayerNorm(x + residual), x + residual)."""
        return ops.layer_norm(x, self.weight, self.bias, self.eps, self.backend, residual)


class Embedding(nn.Module):
    """Token embedding (rows padded to `padded_vocab_size`) plus optional learned positions."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int):
        super().__init__()
        self.word = nn.Embedding(padded_vocab_size, cfg.hidden_size)
        learned = cfg.position_embedding == "learned"
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if learned else None
        self.dropout = nn.Dropout(cfg.embedding_dropout)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`positions` [batch, seq]: each token's position (decoding with a cache, packed
        documents); None: 0..seq-1."""
        x = self.word(input_ids)
        if self.position is not None:
            x = x + (self.position.weight[: input_ids.shape[1]] if positions is None
                     else self.position(positions))
        return self.dropout(x)


class Attention(nn.Module):
    """Multi-query / grouped-query self-attention.

    `kv_proj` rows are laid out [kv_head, (key, value), head_dim], so slicing whole rows splits by
    KV head: that is what tensor parallelism shards, and what MQA's [q; k; v] maps to directly.
    Local head counts are read from the tensors, so sharded copies run the same code.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        self.q_proj = Linear(cfg.hidden_size, cfg.num_attention_heads * d)
        self.kv_proj = Linear(cfg.hidden_size, 2 * cfg.num_query_groups * d)
        self.out_proj = Linear(cfg.num_attention_heads * d, cfg.hidden_size)
        self.window = cfg.sliding_window
        self.dropout_p = cfg.attention_dropout
        self.backend = "torch"
        # A module mapping the input to low-rank updates (of q, of kv) added to both projections:
        # one adapter over [q; kv], as over GPTBigCode's fused c_attn (starcoder.finetune.lora).
        self.input_adapter = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache=None, document_ids: torch.Tensor | None = None, return_bias: bool = False):
        b, s, _ = x.shape
        q, kv = self.q_proj(x), self.kv_proj(x)
        if self.input_adapter is not None:
            dq, dkv = self.input_adapter(x)
            q, kv = q + dq, kv + dkv
        q = q.view(b, s, -1, self.head_dim)
        k, v = kv.view(b, s, -1, 2, self.head_dim).unbind(3)
        if rope is not None:
            q, k = ops.apply_rope(q, k, *rope, backend=self.backend)
        if cache is not None:  # decoding: attend over the cached keys and these, as it masks
            k, v, mask = cache.update(k, v)
            out = masked_attention(q, k, v, mask)
        else:
            dropout_p = self.dropout_p if self.training else 0.0
            with self.rng_fork(x.device) if dropout_p > 0.0 else contextlib.nullcontext():
                out = attention(q, k, v, causal=True, window=self.window, dropout_p=dropout_p,
                                backend=self.backend, document_ids=document_ids)
        return self.out_proj(out.reshape(b, s, -1), return_bias=return_bias)

    def rng_fork(self, device: torch.device):
        """The RNG stream attention dropout draws from, and only it (not the adapters around it):
        the default generators (tensor parallelism gives each rank's heads their own,
        `starcoder.parallel.random.tp_rng_fork`)."""
        return contextlib.nullcontext()


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = Linear(cfg.hidden_size, cfg.ffn_size)
        self.fc_out = Linear(cfg.ffn_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.backend = "torch"

    def forward(self, x: torch.Tensor, return_bias: bool = False):
        h, bias = self.fc_in(x, return_bias=True)
        return self.fc_out(ops.bias_gelu(h, bias, self.approximate, self.backend),
                           return_bias=return_bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.attn = Attention(cfg)
        self.mlp_norm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.backend = "torch"

    def forward(self, x: torch.Tensor, rope=None, cache=None, document_ids=None) -> torch.Tensor:
        """x + dropout(attn(ln(x))), then the same with the MLP. On the Triton path every residual
        add is fused: without dropout, out_proj adds its bias in the GEMM and the MLP's LayerNorm
        adds the residual (one pass for add and norm); with dropout, and after the MLP, one kernel
        adds the bias, drops out and adds the residual (`ops.bias_dropout_add`)."""
        h = self.attn_norm(x)
        if uses_triton(self.backend, x, "layer_norm") and not (self.training and self.dropout.p > 0.0):
            y, x = self.mlp_norm(self.attn(h, rope, cache, document_ids), residual=x)
        else:
            out, bias = self.attn(h, rope, cache, document_ids, return_bias=True)
            x = ops.bias_dropout_add(out, bias, x, self.dropout, self.backend)
            y = self.mlp_norm(x)
        out, bias = self.mlp(y, return_bias=True)
        return ops.bias_dropout_add(out, bias, x, self.dropout, self.backend)


class OutputLayer(nn.Module):
    """Logits over the real vocabulary only: padded rows of the weight are never used, so padding
    (or, later, the tensor-parallel size) cannot change logits, loss or sampling."""

    def __init__(self, cfg: ModelConfig, padded_vocab_size: int):
        super().__init__()
        tied = cfg.tie_word_embeddings
        self.weight = None if tied else nn.Parameter(torch.empty(padded_vocab_size, cfg.hidden_size))
        self.vocab_size = cfg.vocab_size  # rows of the weight that are real tokens
        self.backend = "torch"

    def forward(self, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None):
        w = weight[: self.vocab_size]
        if labels is None:
            return F.linear(h, w)
        return ops.linear_cross_entropy(h, w, labels, self.backend)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, padded_vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab_size = padded_vocab_size or cfg.padded_vocab_size()
        self.embedding = Embedding(cfg, self.padded_vocab_size)
        # A dict keyed by global layer index keeps parameter names stable when a pipeline stage
        # owns only some of the blocks.
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.final_norm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.head = OutputLayer(cfg, self.padded_vocab_size)
        self._rope_cache: dict = {}
        self.set_kernels(cfg.kernels)

    def set_kernels(self, kernels: str, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Pick the kernel backend for every op (`auto` resolves against the device). When `auto`
        means Triton, each kernel first checks itself in `dtype` (default: the parameters'),
        once per process, on every rank together (`starcoder.models.self_check`)."""
        param = next(self.parameters())
        device = param.device if device is None else device
        backend = resolve_backend(kernels, device)
        if backend == "auto":
            run_self_checks(device, dtype or param.dtype, Shapes.of(self.cfg))
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word.weight if self.cfg.tie_word_embeddings else self.head.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cache=None, last_only: bool = False,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab_size] or, with `labels`, per-token fp32 losses [batch, seq]
        (labels of -100 give 0).

        `cache` (decoding, see `starcoder.generation.cache.KVCache`): gives each token's position
        (`cache.positions(seq)`) and, per block name, the object whose `update(k, v)` stores this
        call's keys and values and returns (keys, values, mask) to attend over. `last_only`: logits
        of the last position only, all that decoding reads (a prefill skips the rest of the head).

        `document_ids` [batch, seq] (integer, nondecreasing along each row; packed sequences):
        attention stops at document boundaries and positions restart at 0 in each document
        (`document_positions`), so every document gets what it would alone."""
        if document_ids is not None:
            if cache is not None:
                raise ValueError("GPT.forward: document_ids and a KV cache do not combine")
            if document_ids.shape != input_ids.shape:
                raise ValueError(f"GPT.forward: document_ids {tuple(document_ids.shape)} must have "
                                 f"the shape of input_ids {tuple(input_ids.shape)}")
            positions = document_positions(document_ids)
            x = self.embedding(input_ids, positions)
            rope = self._rope_at(positions)
        elif cache is None:
            x = self.embedding(input_ids)
            rope = self._rope(input_ids.shape[1], x.device)
        else:
            positions = cache.positions(input_ids.shape[1])
            x = self.embedding(input_ids, positions)
            rope = self._rope_at(positions)
        if cache is None:
            x = run_blocks(self.blocks, x, rope, self.cfg, self.training, document_ids)
        else:
            for name, block in self.blocks.items():
                x = block(x, rope, cache[name])
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        return self.head(x, self.output_weight(), labels)

    def _rope(self, seq_len: int, device: torch.device):
        if self.cfg.position_embedding != "rope":
            return None
        key = (seq_len, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = ops.rotary_tables(seq_len, self.cfg.head_dim, self.cfg.rope_theta, device)
        return self._rope_cache[key]

    def _rope_at(self, positions: torch.Tensor):
        """cos, sin [batch, seq, head_dim] for the given positions."""
        if self.cfg.position_embedding != "rope":
            return None
        cos, sin = self._rope(self.cfg.max_position_embeddings, positions.device)
        return cos[positions], sin[positions]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document [batch, seq]: its index minus the index of the
    first token of its document (a run of equal ids) in the row."""
    seq = document_ids.shape[1]
    index = torch.arange(seq, device=document_ids.device).expand_as(document_ids)
    first = torch.ones_like(document_ids, dtype=torch.bool)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(first, index, 0).cummax(1).values
