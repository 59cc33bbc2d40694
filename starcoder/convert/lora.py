"""LoRA tensors as stored, merged and exported: names, shapes, merging into the base weights, and
the PEFT adapter a LoRA checkpoint exports to (the modules that train them are in
`starcoder.finetune.lora`).

Native names, per block `blocks.{i}.` (r = `finetune.lora_rank`, full unsharded shapes):

| target             | tensors                                                                  |
|--------------------|--------------------------------------------------------------------------|
| q_proj and kv_proj | `attn.input_adapter.lora_A` [r, hidden], shared by both;                 |
|                    | `attn.input_adapter.lora_B_q` [q rows, r], `.lora_B_kv` [kv rows, r]      |
| out_proj           | `attn.out_proj.lora_A` [r, q rows], `attn.out_proj.lora_B` [hidden, r]    |
| fc_in              | `mlp.fc_in.lora_A` [r, hidden], `mlp.fc_in.lora_B` [ffn, r]              |
| fc_out             | `mlp.fc_out.lora_A` [r, ffn], `mlp.fc_out.lora_B` [hidden, r]            |

The adapted weight is W + (alpha / r) B A. The B rows follow the base weight's rows, so the
Hugging Face packing of the base (GPTBigCode's fused `c_attn`, Starcoder2's separate k/v,
`starcoder.convert.hf`) packs B too, while A, on the input side, is shared: one `c_attn` adapter
for GPTBigCode, the same A for Starcoder2's `q_proj`, `k_proj` and `v_proj`.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from starcoder.config import Config
from starcoder.convert.hf import native_to_hf

LORA_MARK = "lora_"  # in every LoRA tensor's name, in no base weight's
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Hugging Face module (after the layer prefix) -> the native A it uses.
_HF_A = {
    "gpt_bigcode": {"attn.c_attn": "attn.input_adapter.lora_A", "attn.c_proj": "attn.out_proj.lora_A",
                    "mlp.c_fc": "mlp.fc_in.lora_A", "mlp.c_proj": "mlp.fc_out.lora_A"},
    "starcoder2": {"self_attn.q_proj": "attn.input_adapter.lora_A",
                   "self_attn.k_proj": "attn.input_adapter.lora_A",
                   "self_attn.v_proj": "attn.input_adapter.lora_A",
                   "self_attn.o_proj": "attn.out_proj.lora_A",
                   "mlp.c_fc": "mlp.fc_in.lora_A", "mlp.c_proj": "mlp.fc_out.lora_A"},
}
_HF_LAYER = re.compile(r"^((?:transformer\.h|model\.layers)\.(\d+))\.(.+)\.weight$")


def is_lora(name: str) -> bool:
    return LORA_MARK in name


def scaling(cfg: Config) -> float:
    return cfg.finetune.lora_alpha / cfg.finetune.lora_rank


def adapted_weights(cfg: Config) -> dict[str, tuple[str, str]]:
    """Base weight name -> (its A, its B) for every weight the config adapts ({} without LoRA)."""
    f = cfg.finetune
    if not f.lora_rank:
        return {}
    out = {}
    for i in range(cfg.model.num_layers):
        b = f"blocks.{i}."
        for target in ("q_proj", "kv_proj"):
            if target in f.lora_targets:
                out[f"{b}attn.{target}.weight"] = (f"{b}attn.input_adapter.lora_A",
                                                   f"{b}attn.input_adapter.lora_B_{target[:-5]}")
        for target, module in (("out_proj", "attn.out_proj"), ("fc_in", "mlp.fc_in"),
                               ("fc_out", "mlp.fc_out")):
            if target in f.lora_targets:
                out[f"{b}{module}.weight"] = (f"{b}{module}.lora_A", f"{b}{module}.lora_B")
    return out


def lora_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """LoRA tensor name -> full shape ({} without LoRA)."""
    m, r = cfg.model, cfg.finetune.lora_rank
    rows = {"q_proj": m.num_attention_heads * m.head_dim, "kv_proj": 2 * m.num_query_groups * m.head_dim,
            "out_proj": m.hidden_size, "fc_in": m.ffn_size, "fc_out": m.hidden_size}
    cols = {"q_proj": m.hidden_size, "kv_proj": m.hidden_size, "out_proj": rows["q_proj"],
            "fc_in": m.hidden_size, "fc_out": m.ffn_size}
    out = {}
    for weight, (a, b) in adapted_weights(cfg).items():
        target = weight.split(".")[-2]
        out[a] = (r, cols[target])
        out[b] = (rows[target], r)
    return out


def delta(cfg: Config, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The update (alpha / r) B A of a base weight, in fp32."""
    return scaling(cfg) * (b.float() @ a.float())


def merge_lora(cfg: Config, tensors: Iterable[tuple[str, torch.Tensor]],
               lora: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The base tensors of a stream with the adapters merged in (W + (alpha / r) B A, in the base
    weight's dtype); the stream's own LoRA tensors are dropped (`lora` holds them, full)."""
    adapted = adapted_weights(cfg)
    for name, tensor in tensors:
        if is_lora(name):
            continue
        if name in adapted:
            a, b = adapted[name]
            tensor = (tensor.float() + delta(cfg, lora[a], lora[b])).to(tensor.dtype)
        yield name, tensor


def peft_adapter(cfg: Config, lora: dict[str, torch.Tensor], base_model: str | None = None
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json contents, {PEFT tensor name: tensor}) of the adapters in `lora` (full
    native tensors): a folder `peft.PeftModel.from_pretrained` loads onto the Hugging Face export
    of the base. GPTBigCode's `c_attn` gets one adapter (B over [q; kv]; an untargeted half is
    zero); Starcoder2's q/k/v adapters share A, with B split as the weights are."""
    m = cfg.model
    adapted = adapted_weights(cfg)
    fused = m.architecture == "gpt_bigcode"

    def b_stream():  # each adapted weight's B under the weight's own name, packed as the weight
        for i in range(m.num_layers):
            b = f"blocks.{i}."
            for target in ("q_proj", "kv_proj"):
                weight = f"{b}attn.{target}.weight"
                if weight in adapted:
                    yield weight, lora[adapted[weight][1]]
                elif fused and f"{b}attn.input_adapter.lora_A" in lora:  # c_attn's other half
                    rows = m.num_attention_heads * m.head_dim if target == "q_proj" \
                        else 2 * m.num_query_groups * m.head_dim
                    yield weight, torch.zeros(rows, cfg.finetune.lora_rank, dtype=lora[
                        f"{b}attn.input_adapter.lora_A"].dtype)
            for module in ("attn.out_proj", "mlp.fc_in", "mlp.fc_out"):
                weight = f"{b}{module}.weight"
                if weight in adapted:
                    yield weight, lora[adapted[weight][1]]

    tensors, modules = {}, set()
    for hf_name, b_tensor in native_to_hf(m, b_stream()):
        match = _HF_LAYER.match(hf_name)
        prefix, layer, module = match.group(1), match.group(2), match.group(3)
        a_tensor = lora[f"blocks.{layer}.{_HF_A[m.architecture][module]}"]
        tensors[f"{PEFT_PREFIX}{prefix}.{module}.lora_A.weight"] = a_tensor.clone()  # q/k/v: own copies
        tensors[f"{PEFT_PREFIX}{prefix}.{module}.lora_B.weight"] = b_tensor.contiguous()
        modules.add(module)
    f = cfg.finetune
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": f.lora_rank,
        "lora_alpha": f.lora_alpha,
        "lora_dropout": f.lora_dropout,
        "target_modules": sorted(modules),  # suffixes: `attn.c_proj` is not `mlp.c_proj`
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return config, tensors
