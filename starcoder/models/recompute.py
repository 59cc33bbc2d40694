"""Activation recomputation of transformer blocks (`model.recompute`, `model.recompute_layers`).

- `none`: every op saves what its backward needs.
- `selective`: op-level selective activation checkpointing, as torchtitan does it. Each block runs
  under `torch.utils.checkpoint` with a policy: the outputs of the ops named in `SAVED_OPS` (the
  GEMMs and attention, FlexAttention included) are kept from the forward; every other op of the block (LayerNorm, GeLU,
  bias adds, dropout masks, RoPE, residual adds, the tensor-parallel collectives) runs again in
  backward, from the block input and those outputs. Attention and the GEMMs never run twice.
- `full`: whole blocks recompute from their input (one [batch, seq, hidden] tensor per block).
  `model.recompute_layers: N` recomputes only the first N blocks of each model chunk (Megatron's
  `--recompute-method block --recompute-num-layers N`); the others save everything.

The rule for `SAVED_OPS`: an op is saved when running it again costs FLOPs (a GEMM, attention);
memory-bound ops, custom Triton ones included (`starcoder::layer_norm_forward`,
`starcoder::bias_gelu_forward`, `starcoder::rope`, a fused bias + dropout + residual), are
recomputed, so they stay off the list. A saved op must be out-of-place, and its output must not be
modified in place later (the checkpoint checks version counters and fails otherwise). That rules
out the c10d collectives (`starcoder.parallel.collectives`): they write into a buffer the caller
allocated, so a cached result would leave the replayed buffer unwritten. They are replayed
instead, which costs the same communication as `full` recompute in backward (per block under
sequence parallelism two all-gathers and a reduce-scatter, a second one with hidden dropout; one
all-reduce, two with hidden dropout, without). The recomputation stops at the last tensor the
backward needs, so ops after it (the MLP's output collective without dropout) do not run again;
fc_out's output is kept all the same (T x h per block), which is what spares its GEMM when hidden
dropout follows it.

The saved outputs are handed back once: `selective` cannot run under the zero-bubble schedule,
whose split backward goes through each block twice (refused in `starcoder.config`; `full`
works there and recomputes each block in both passes).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# Operator names (`op._schema.name`, every overload) whose outputs `selective` keeps.
# `aten::linear` never reaches the policy: autograd decomposes it into mm / addmm first.
SAVED_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm",
    # SDPA's kernels (CPU flash, CUDA flash / memory-efficient / cuDNN); its math path decomposes
    # into bmm and softmax, and keeps the two bmm outputs.
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    # starcoder.kernels.flash_attention (output and log-sum-exp).
    "starcoder::flash_attention_forward",
})


def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save the outputs of `SAVED_OPS`, recompute everything else."""
    schema = getattr(op, "_schema", None)  # higher-order ops have none
    if schema is not None and schema.name in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    if op is torch.ops.higher_order.flex_attention:  # CUDA's window / packed-document fallback
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    # Looked up at each call, so a test can wrap `policy` to see what is kept.
    return create_selective_checkpoint_contexts(policy)


def block_modes(recompute: str, recompute_layers: int | None, count: int) -> list[str]:
    """The recompute mode of each of a model chunk's `count` blocks, in order."""
    if recompute == "full" and recompute_layers is not None:
        full = min(recompute_layers, count)
        return ["full"] * full + ["none"] * (count - full)
    return [recompute] * count


def run_block(block: torch.nn.Module, x: torch.Tensor, rope, mode: str,
              document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`block(x, rope, None, document_ids)` under recompute mode `mode` (training; no KV cache)."""
    if mode == "full":
        return checkpoint(block, x, rope, None, document_ids, use_reentrant=False)
    if mode == "selective":
        return checkpoint(block, x, rope, None, document_ids, use_reentrant=False,
                          context_fn=_selective_contexts)
    return block(x, rope, None, document_ids)


def run_blocks(blocks, x: torch.Tensor, rope, cfg, training: bool,
               document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run a model chunk's blocks (`blocks`: the ModuleDict a model or pipeline stage owns) in
    order; in training, each under its recompute mode from `cfg` (a ModelConfig). `document_ids`:
    packed documents (see `starcoder.models.attention`)."""
    modes = (block_modes(cfg.recompute, cfg.recompute_layers, len(blocks)) if training
             else ["none"] * len(blocks))
    for block, mode in zip(blocks.values(), modes):
        x = run_block(block, x, rope, mode, document_ids)
    return x
