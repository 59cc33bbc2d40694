"""Hand-written Triton kernels, each beside its PyTorch reference (`*_reference`).

Every kernel is a `torch.library` custom op (namespace `starcoder`) with a fake implementation
and registered autograd, so `torch.compile` traces through calls without graph breaks. Inputs
may be fp16, bf16 or fp32; accumulation is fp32. On CPU the kernels run under the Triton
interpreter (TRITON_INTERPRET=1), which is how the test suite checks them.

Model-facing entry points (what `starcoder.models.ops` / `attention` call with `kernels: triton`):

    flash_attention(q, k, v, causal=True, window=None, scale=None, document_ids=None)
        q [b, s, hq, d], k/v [b, s, hk, d] (hq % hk == 0), d in {16, 32, 64, 128, 256};
        window W: query i sees keys i - W < j <= i. No dropout. document_ids [b, s] (integer,
        nondecreasing per row; the varlen form of cu_seqlens): attention within documents only,
        tiles of other documents skipped. attention_reference takes the same arguments.
    layer_norm(x, weight, bias, eps, residual=None)
        -> y, or (y, x + residual) with the residual add fused.
    bias_gelu(x, bias)                      gelu_tanh(x + bias)
    bias_dropout_add(x, bias, residual, p=0.0, seed=None)
        residual + dropout(x + bias, p); the mask is Philox randomness of `seed` (int64 [1] from
        torch's generator on x's device, `draw_seed`), regenerated in backward, never stored.
    apply_rope(q, k, cos, sin)              rotate-half RoPE; cos/sin [>= s, d] fp32
    cross_entropy(logits, labels, inplace_backward=False)
        per-token fp32 loss, label -100 -> 0
    linear_cross_entropy(hidden, weight, labels, chunk_rows=None)
        cross_entropy(hidden @ weight.T, labels) without ever holding all logits

Vocabulary-parallel cross-entropy (for `starcoder.parallel`, which owns the all-reduces). Each
tensor-parallel rank holds logits [tokens, V/tp] for global columns [vocab_start, vocab_start +
V/tp) and the full labels [tokens]:

    row_max, sum_exp, target = cross_entropy_shard_stats(logits, labels, vocab_start)
        # fp32 [tokens] each: max logit of the shard, sum(exp(logit - row_max)) over the shard,
        # the label's logit if the label lies in this shard else 0.
    global_max = row_max.clone(); all_reduce(global_max, MAX)
    sum_exp = sum_exp * torch.exp(row_max - global_max); all_reduce(sum_exp, SUM)
    all_reduce(target, SUM)
    lse = global_max + torch.log(sum_exp)
    loss = torch.where(labels == -100, 0.0, lse - target)          # per token, fp32
    # backward, given grad = d total / d loss per token (fp32 [tokens]):
    grad_logits = cross_entropy_shard_backward(logits, labels, lse, grad, vocab_start,
                                               inplace=False)
        # (softmax_global - onehot) * grad for this shard's columns; rows labelled -100 get 0;
        # inplace=True writes into `logits` (contiguous) and returns it.

Both are custom ops without autograd (wrap them in the tensor-parallel autograd Function). With
tp = 1 and vocab_start = 0 the recipe reduces to `cross_entropy` (which is built from them).
"""

from starcoder.kernels.bias_dropout_add import (
    bias_dropout_add,
    bias_dropout_add_reference,
    draw_seed,
)
from starcoder.kernels.bias_gelu import bias_gelu, bias_gelu_reference
from starcoder.kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    cross_entropy_shard_backward,
    cross_entropy_shard_stats,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from starcoder.kernels.flash_attention import attention_reference, flash_attention
from starcoder.kernels.layer_norm import layer_norm, layer_norm_reference
from starcoder.kernels.rope import apply_rope, rope_reference

__all__ = [
    "apply_rope",
    "attention_reference",
    "bias_dropout_add",
    "bias_dropout_add_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "cross_entropy_shard_backward",
    "cross_entropy_shard_stats",
    "draw_seed",
    "flash_attention",
    "layer_norm",
    "layer_norm_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "rope_reference",
]
