"""Hugging Face <-> native mapping for GPTBigCodeForCausalLM and Starcoder2ForCausalLM.

No transposes and no RoPE permutations are needed (starcoder-spec.md §5): every Linear is
[out, in] on both sides and both use rotate-half RoPE. What changes is how attention projections
are packed:

* native `kv_proj` rows are [kv_head, (key, value), head_dim];
* GPTBigCode MQA `c_attn` = [q (all heads); k; v]: for one KV head that is [q_proj; kv_proj];
* GPTBigCode MHA `c_attn` interleaves per head: [head, (q, k, v), head_dim];
* Starcoder2 keeps q_proj, k_proj, v_proj apart.

Conversion streams: a rule names the tensors it needs on each side; tensors are buffered only until
their rule is complete (at most one layer's attention weights), then emitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from starcoder.config import ModelConfig

Tensors = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # name templates with {i} for the layer
    native: tuple[str, ...]
    to_hf: Callable[..., Tensors] | None = None  # native tensors -> hf tensors (None: identity)
    to_native: Callable[..., Tensors] | None = None


def _pairs(hf_prefix: str, native_prefix: str, leaves=("weight", "bias")) -> list[Rule]:
    return [Rule((f"{hf_prefix}.{leaf}",), (f"{native_prefix}.{leaf}",)) for leaf in leaves]


def rules(cfg: ModelConfig) -> list[Rule]:
    n, g, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    out: list[Rule] = []
    if cfg.architecture == "gpt_bigcode":
        layer = "transformer.h.{i}"
        out += [Rule(("transformer.wte.weight",), ("embedding.word.weight",)),
                Rule(("transformer.wpe.weight",), ("embedding.position.weight",))]
        out += _pairs(f"{layer}.ln_1", "blocks.{i}.attn_norm")
        out += _pairs(f"{layer}.ln_2", "blocks.{i}.mlp_norm")
        pack, unpack = (_mqa_pack, _mqa_unpack(n * d)) if g == 1 else (_mha_pack(n, d), _mha_unpack(n, d))
        for leaf in ("weight", "bias"):
            out.append(Rule((f"{layer}.attn.c_attn.{leaf}",),
                            (f"blocks.{{i}}.attn.q_proj.{leaf}", f"blocks.{{i}}.attn.kv_proj.{leaf}"),
                            pack, unpack))
        out += _pairs(f"{layer}.attn.c_proj", "blocks.{i}.attn.out_proj")
        out += _pairs(f"{layer}.mlp.c_fc", "blocks.{i}.mlp.fc_in")
        out += _pairs(f"{layer}.mlp.c_proj", "blocks.{i}.mlp.fc_out")
        out += _pairs("transformer.ln_f", "final_norm")
    else:
        layer = "model.layers.{i}"
        out.append(Rule(("model.embed_tokens.weight",), ("embedding.word.weight",)))
        out += _pairs(f"{layer}.input_layernorm", "blocks.{i}.attn_norm")
        out += _pairs(f"{layer}.post_attention_layernorm", "blocks.{i}.mlp_norm")
        out += _pairs(f"{layer}.self_attn.q_proj", "blocks.{i}.attn.q_proj")
        for leaf in ("weight", "bias"):
            out.append(Rule((f"{layer}.self_attn.k_proj.{leaf}", f"{layer}.self_attn.v_proj.{leaf}"),
                            (f"blocks.{{i}}.attn.kv_proj.{leaf}",), _kv_split(g, d), _kv_join(g, d)))
        out += _pairs(f"{layer}.self_attn.o_proj", "blocks.{i}.attn.out_proj")
        out += _pairs(f"{layer}.mlp.c_fc", "blocks.{i}.mlp.fc_in")
        out += _pairs(f"{layer}.mlp.c_proj", "blocks.{i}.mlp.fc_out")
        out += _pairs("model.norm", "final_norm")
    if not cfg.tie_word_embeddings:
        out.append(Rule(("lm_head.weight",), ("head.weight",)))
    return out


# HF checkpoints may carry these; they are buffers or tied copies, not weights to convert.
def ignored_hf(cfg: ModelConfig) -> re.Pattern:
    patterns = [r".*\.attn\.(bias|masked_bias)$", r".*rotary_emb\.inv_freq$"]
    if cfg.tie_word_embeddings:
        patterns.append(r"lm_head\.weight$")
    return re.compile("|".join(f"(?:{p})" for p in patterns))


# ---- packing helpers (each returns a tuple of tensors) --------------------------------------

def _mqa_pack(q, kv):
    return (torch.cat([q, kv], dim=0),)


def _mqa_unpack(q_rows: int):
    return lambda c_attn: (c_attn[:q_rows], c_attn[q_rows:])


def _mha_pack(n: int, d: int):
    def pack(q, kv):
        rest = q.shape[1:]
        per_head = torch.cat([q.reshape(n, 1, d, *rest), kv.reshape(n, 2, d, *rest)], dim=1)
        return (per_head.reshape(3 * n * d, *rest),)
    return pack


def _mha_unpack(n: int, d: int):
    def unpack(c_attn):
        rest = c_attn.shape[1:]
        per_head = c_attn.reshape(n, 3, d, *rest)
        return (per_head[:, 0].reshape(n * d, *rest), per_head[:, 1:].reshape(2 * n * d, *rest))
    return unpack


def _kv_split(g: int, d: int):
    def split(kv):
        rest = kv.shape[1:]
        grouped = kv.reshape(g, 2, d, *rest)
        return grouped[:, 0].reshape(g * d, *rest), grouped[:, 1].reshape(g * d, *rest)
    return split


def _kv_join(g: int, d: int):
    def join(k, v):
        rest = k.shape[1:]
        return (torch.stack([k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1).reshape(2 * g * d, *rest),)
    return join


def native_origins(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable | None, int]]:
    """native name -> (the HF tensors it is made of, the function that makes the native tensors
    from them (None: the identity), which of its outputs it is): what a reader of one slice of a
    native tensor needs to know."""
    origins = {}
    for rule in rules(cfg):
        layers = range(cfg.num_layers) if "{i}" in rule.native[0] else [None]
        for layer in layers:
            fill = (lambda t: t) if layer is None else (lambda t: t.replace("{i}", str(layer)))
            for pos, native in enumerate(rule.native):
                origins[fill(native)] = (tuple(map(fill, rule.hf)), rule.to_native, pos)
    return origins


# ---- streaming engine ------------------------------------------------------------------------

def native_to_hf(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    return _convert(rules(cfg), tensors, direction="to_hf", ignored=None)


def hf_to_native(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    return _convert(rules(cfg), tensors, direction="to_native", ignored=ignored_hf(cfg))


def _convert(rule_list: list[Rule], tensors, direction: str, ignored: re.Pattern | None):
    src_side, dst_side = ("native", "hf") if direction == "to_hf" else ("hf", "native")
    lookup: dict[str, tuple[Rule, int]] = {}
    patterns = []
    for rule in rule_list:
        for pos, template in enumerate(getattr(rule, src_side)):
            if "{i}" in template:
                patterns.append((re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$"), rule, pos))
            else:
                lookup[template] = (rule, pos)
    pending: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, tensor in tensors:
        found = _match(name, lookup, patterns)
        if found is None:
            if ignored is not None and ignored.match(name):
                continue
            raise KeyError(f"no conversion rule for tensor {name!r}")
        rule, pos, layer = found
        sources = getattr(rule, src_side)
        key = (id(rule), layer)
        parts = pending.setdefault(key, {})
        parts[pos] = tensor
        if len(parts) < len(sources):
            continue
        del pending[key]
        fn = getattr(rule, direction) or (lambda *t: t)
        outputs = fn(*(parts[i] for i in range(len(sources))))
        for template, out in zip(getattr(rule, dst_side), outputs):
            yield template.replace("{i}", str(layer)), out
    if pending:
        missing = sorted(getattr(r, src_side)[0].replace("{i}", str(layer))
                         for r in rule_list for (rid, layer) in pending if rid == id(r))
        raise KeyError(f"incomplete checkpoint: partner tensors missing for {missing}")


def _match(name, lookup, patterns):
    if name in lookup:
        rule, pos = lookup[name]
        return rule, pos, -1
    for pattern, rule, pos in patterns:
        m = pattern.match(name)
        if m:
            return rule, pos, int(m.group(1))
    return None


# ---- config.json -----------------------------------------------------------------------------

_ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
# gelu_new and gelu_fast are the same tanh formula as gelu_pytorch_tanh.
_ACT_FROM_HF = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu"}


def hf_config(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """A config.json that current `transformers` reads as the same model."""
    common = {
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "initializer_range": cfg.init_method_std,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if dtype is not None:
        common["torch_dtype"] = str(dtype).removeprefix("torch.")
    if cfg.architecture == "gpt_bigcode":
        return {
            "architectures": ["GPTBigCodeForCausalLM"],
            "model_type": "gpt_bigcode",
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_attention_heads,
            "n_inner": cfg.ffn_size,
            "n_positions": cfg.max_position_embeddings,
            "multi_query": cfg.num_query_groups == 1,
            "activation_function": _ACT_TO_HF[cfg.activation],
            "layer_norm_epsilon": cfg.layernorm_epsilon,
            "attn_pdrop": cfg.attention_dropout,
            "resid_pdrop": cfg.hidden_dropout,
            "embd_pdrop": cfg.embedding_dropout,
            "scale_attn_weights": True,
            "attention_softmax_in_fp32": True,
            "scale_attention_softmax_in_fp32": True,
            **common,
        }
    return {
        "architectures": ["Starcoder2ForCausalLM"],
        "model_type": "starcoder2",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "intermediate_size": cfg.ffn_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "norm_epsilon": cfg.layernorm_epsilon,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window,
        "attention_dropout": cfg.attention_dropout,
        "residual_dropout": cfg.hidden_dropout,
        "embedding_dropout": cfg.embedding_dropout,
        "use_bias": True,
        **common,
    }


def model_config_from_hf(hf: dict) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "gpt_bigcode":
        hidden = hf["n_embd"]
        return ModelConfig(
            architecture="gpt_bigcode",
            num_layers=hf["n_layer"],
            hidden_size=hidden,
            num_attention_heads=hf["n_head"],
            num_query_groups=1 if hf.get("multi_query", True) else hf["n_head"],
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["n_positions"],
            position_embedding="learned",
            activation=_activation(hf.get("activation_function", "gelu_pytorch_tanh")),
            layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=True,
            init_method_std=hf.get("initializer_range", 0.02),
            attention_dropout=hf.get("attn_pdrop", 0.0),
            hidden_dropout=hf.get("resid_pdrop", 0.0),
            embedding_dropout=hf.get("embd_pdrop", 0.0),
            bos_token_id=_token_id(hf.get("bos_token_id"), hf["vocab_size"]),
            eos_token_id=_token_id(hf.get("eos_token_id"), hf["vocab_size"]),
        )
    if kind == "starcoder2":
        rope = hf.get("rope_parameters") or {}
        return ModelConfig(
            architecture="starcoder2",
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"],
            num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            position_embedding="rope",
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            sliding_window=hf.get("sliding_window"),
            activation=_activation(hf.get("hidden_act", "gelu_pytorch_tanh")),
            layernorm_epsilon=hf.get("norm_epsilon", 1e-5),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            init_method_std=hf.get("initializer_range", 0.02),
            attention_dropout=hf.get("attention_dropout", 0.0),
            hidden_dropout=hf.get("residual_dropout", 0.0),
            embedding_dropout=hf.get("embedding_dropout", 0.0),
            bos_token_id=_token_id(hf.get("bos_token_id"), hf["vocab_size"]),
            eos_token_id=_token_id(hf.get("eos_token_id"), hf["vocab_size"]),
        )
    raise ValueError(f"unsupported Hugging Face model_type {kind!r} (expected gpt_bigcode or starcoder2)")


def _activation(name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(f"unsupported activation {name!r} (expected one of {sorted(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[name]


def _token_id(value, vocab_size: int) -> int:
    # Some released configs carry an out-of-range id (starcoder2-7b once shipped 49152): use 0,
    # the <|endoftext|> of every StarCoder tokenizer.
    return value if isinstance(value, int) and 0 <= value < vocab_size else 0
