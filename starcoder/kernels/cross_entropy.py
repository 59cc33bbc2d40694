"""Cross-entropy over large vocabularies, per shard, plus a chunked fused linear + cross-entropy.

The forward reads each row of logits once, in its own dtype, and keeps three fp32 numbers per row:
the row max, the sum of exp(logit - max) and the target logit (0 when the label lies in another
shard). Those are exactly what a vocabulary-parallel loss all-reduces, so one kernel serves both:
a single device combines them itself, tensor parallelism reduces them across ranks first (see
`starcoder.kernels` for the recipe). The backward takes the (global) log-sum-exp and writes
(softmax - onehot) * grad, optionally into the logits' own storage. Labels of -100 give loss 0
and gradient 0. No fp32 copy of the logits is ever made.

`linear_cross_entropy` never holds more than one chunk of logits: the forward computes each
chunk's logits, reduces them and drops them; the backward recomputes them chunk by chunk, turns
them into gradients in place and feeds the two matmuls for dHidden and dWeight. Recomputing costs
one extra matmul over the output layer, which buys per-token upstream gradients (any loss
weighting or masking the trainer applies) without storing [tokens, vocab].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from starcoder.kernels._triton import INTERPRET, check_dtype, next_power_of_2, rows_view

IGNORE_INDEX = -100


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           reduction="none", ignore_index=IGNORE_INDEX)
    return flat.view(labels.shape)


def linear_cross_entropy_reference(hidden, weight, labels):
    return cross_entropy_reference(F.linear(hidden, weight), labels)


@triton.jit
def _ce_stats(LOGITS, LABELS, MAX, SUMEXP, TARGET, stride_row, vocab, vocab_start,
              BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    for start in range(0, vocab, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < vocab, other=-float("inf"))
        x = x.to(tl.float32) * 1.4426950408889634  # log2 units
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(x - m_new), 0)
        m = m_new
    label = tl.load(LABELS + row) - vocab_start
    here = (label >= 0) & (label < vocab)
    target = tl.load(base + label, mask=here, other=0.0).to(tl.float32)
    tl.store(MAX + row, m * 0.6931471805599453)
    tl.store(SUMEXP + row, s)
    tl.store(TARGET + row, target)


@triton.jit
def _ce_backward(LOGITS, LABELS, LSE, GRAD, DLOGITS, stride_row, stride_drow, vocab, vocab_start,
                 BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row)
    grad = tl.where(label == -100, 0.0, tl.load(GRAD + row).to(tl.float32))
    lse = tl.load(LSE + row) * 1.4426950408889634
    label -= vocab_start
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab, BLOCK_V):
        mask = start + cols < vocab
        x = tl.load(LOGITS + row * stride_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.math.exp2(x * 1.4426950408889634 - lse)
        d = (p - tl.where(start + cols == label, 1.0, 0.0)) * grad
        tl.store(DLOGITS + row * stride_drow + start + cols, d.to(DLOGITS.dtype.element_ty), mask=mask)


def _block_v(vocab: int) -> int:
    return min(next_power_of_2(vocab), 64 if INTERPRET else 8192)


def _warps(block_v: int) -> int:
    return 8 if block_v >= 4096 else 4


# ------------------------------------------------------------------------------------------------
# Per-shard pieces (custom ops without autograd; the caller owns the reduction and the autograd)


@torch.library.custom_op("starcoder::cross_entropy_shard_stats", mutates_args=())
def _stats_op(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    row_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
    sum_exp, target = torch.empty_like(row_max), torch.empty_like(row_max)
    block = _block_v(vocab)
    _ce_stats[(rows,)](logits, labels, row_max, sum_exp, target, logits.stride(0), vocab,
                       vocab_start, BLOCK_V=block, num_warps=_warps(block))
    return row_max, sum_exp, target


@_stats_op.register_fake
def _(logits, labels, vocab_start):
    stats = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return stats, torch.empty_like(stats), torch.empty_like(stats)


def _launch_backward(logits, labels, lse, grad, vocab_start, out):
    rows, vocab = logits.shape
    block = _block_v(vocab)
    _ce_backward[(rows,)](logits, labels, lse, grad, out, logits.stride(0), out.stride(0), vocab,
                          vocab_start, BLOCK_V=block, num_warps=_warps(block))


@torch.library.custom_op("starcoder::cross_entropy_shard_backward", mutates_args=())
def _backward_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                 grad: torch.Tensor, vocab_start: int) -> torch.Tensor:
    out = torch.empty_like(logits)
    _launch_backward(logits, labels, lse, grad, vocab_start, out)
    return out


@_backward_op.register_fake
def _(logits, labels, lse, grad, vocab_start):
    return torch.empty_like(logits)


@torch.library.custom_op("starcoder::cross_entropy_shard_backward_", mutates_args=("logits",))
def _backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                         grad: torch.Tensor, vocab_start: int) -> None:
    _launch_backward(logits, labels, lse, grad, vocab_start, logits)


def _rows(logits, labels, name):
    check_dtype(f"{name} logits", logits)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"{name}: labels {tuple(labels.shape)} must be logits' leading dims "
                         f"{tuple(logits.shape[:-1])}")
    return rows_view(logits), labels.reshape(-1).long()


def cross_entropy_shard_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0):
    """Per row of a vocabulary shard: (row_max, sum_exp, target_logit), fp32 [rows].

    logits [..., shard_vocab] hold global columns [vocab_start, vocab_start + shard_vocab);
    sum_exp = sum(exp(logit - row_max)); target_logit is the label's logit, 0 when the label is in
    another shard or is -100. Not differentiable: pair it with `cross_entropy_shard_backward`.
    """
    logits2, labels1 = _rows(logits, labels, "cross_entropy_shard_stats")
    return _stats_op(logits2, labels1, int(vocab_start))


def cross_entropy_shard_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                                 grad: torch.Tensor, vocab_start: int = 0,
                                 inplace: bool = False) -> torch.Tensor:
    """d loss / d logits for one shard: (exp(logit - lse) - onehot(label)) * grad per row.

    lse: the global log-sum-exp per row (fp32 [rows]); grad: d total / d per-token loss [rows].
    Rows labelled -100 get 0. `inplace` writes into `logits` (which must then not be needed
    again; any row stride, e.g. the real columns of a padded shard) and returns it: no second
    [rows, shard_vocab] buffer.
    """
    logits2, labels1 = _rows(logits, labels, "cross_entropy_shard_backward")
    lse, grad = lse.reshape(-1).float().contiguous(), grad.reshape(-1).float().contiguous()
    if inplace:
        if logits2.data_ptr() != logits.data_ptr():  # rows_view copied: writing there is lost
            raise ValueError("cross_entropy_shard_backward: inplace needs logits whose rows are a "
                             "view (unit stride along the vocabulary)")
        _backward_inplace_op(logits2, labels1, lse, grad, int(vocab_start))
        return logits
    return _backward_op(logits2, labels1, lse, grad, int(vocab_start)).view(logits.shape)


def _combine(row_max, sum_exp, target, labels):
    """Single shard: (per-token loss, lse) from the statistics."""
    lse = row_max + torch.log(sum_exp)
    return torch.where(labels == IGNORE_INDEX, 0.0, lse - target), lse


# ------------------------------------------------------------------------------------------------
# Whole-vocabulary cross-entropy with autograd


@torch.library.custom_op("starcoder::cross_entropy", mutates_args=())
def _ce_op(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    return _combine(*_stats_op(logits, labels, 0), labels)


@_ce_op.register_fake
def _(logits, labels, inplace_backward):
    loss = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(loss)


def _ce_setup(ctx, inputs, output):
    logits, labels, inplace_backward = inputs
    ctx.inplace = inplace_backward
    ctx.save_for_backward(logits, labels, output[1])


def _ce_backward_fn(ctx, grad_loss, grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad_loss = grad_loss.float().contiguous()
    if ctx.inplace:
        _backward_inplace_op(logits, labels, lse, grad_loss, 0)
        return logits, None, None
    return _backward_op(logits, labels, lse, grad_loss, 0), None, None


_ce_op.register_autograd(_ce_backward_fn, setup_context=_ce_setup)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  inplace_backward: bool = False) -> torch.Tensor:
    """Per-token fp32 loss shaped like labels (label -100 -> 0).

    `inplace_backward` writes the gradient into the logits' storage (as Liger-Kernel does), so the
    backward allocates nothing of size [tokens, vocab]; only use it when nothing else reads the
    logits after the loss (autograd's version check catches a later reader that saved them).
    """
    logits2, labels1 = _rows(logits, labels, "cross_entropy")
    if inplace_backward and logits2.data_ptr() != logits.data_ptr():
        inplace_backward = False  # a reshaped copy: writing into it saves nothing
    loss, _ = _ce_op(logits2, labels1, inplace_backward)
    return loss.view(labels.shape)


# ------------------------------------------------------------------------------------------------
# Chunked linear + cross-entropy


def default_chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so one chunk's logits are about as large as the hidden states."""
    return min(max(next_power_of_2(math.ceil(tokens * hidden / vocab)), 64), next_power_of_2(tokens))


@torch.library.custom_op("starcoder::linear_cross_entropy_forward", mutates_args=())
def _lce_forward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = hidden[rows] @ weight.t()
        loss[rows], lse[rows] = _combine(*_stats_op(logits, labels[rows], 0), labels[rows])
    return loss, lse


@_lce_forward_op.register_fake
def _(hidden, weight, labels, chunk_rows):
    loss = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(loss)


@torch.library.custom_op("starcoder::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                     labels: torch.Tensor, lse: torch.Tensor, chunk_rows: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    grad_hidden = torch.empty_like(hidden)
    # fp32 accumulation across chunks: a bf16 running sum would round once per chunk.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = hidden[rows] @ weight.t()
        _backward_inplace_op(logits, labels[rows], lse[rows], grad_loss[rows], 0)
        torch.mm(logits, weight, out=grad_hidden[rows])
        if logits.dtype == torch.float32:
            grad_weight.addmm_(logits.t(), hidden[rows])
        else:  # one rounding per chunk product, the running sum stays fp32
            grad_weight += logits.t() @ hidden[rows]
    return grad_hidden, grad_weight.to(weight.dtype)


@_lce_backward_op.register_fake
def _(grad_loss, hidden, weight, labels, lse, chunk_rows):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _lce_setup(ctx, inputs, output):
    hidden, weight, labels, chunk_rows = inputs
    ctx.chunk_rows = chunk_rows
    ctx.save_for_backward(hidden, weight, labels, output[1])


def _lce_backward(ctx, grad_loss, grad_lse):
    hidden, weight, labels, lse = ctx.saved_tensors
    grad_hidden, grad_weight = _lce_backward_op(grad_loss.float().contiguous(), hidden, weight,
                                                labels, lse, ctx.chunk_rows)
    return grad_hidden, grad_weight, None, None


_lce_forward_op.register_autograd(_lce_backward, setup_context=_lce_setup)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, labels) per token (fp32, label -100 -> 0), chunked.

    hidden [..., h], weight [vocab, h], labels [...]. Logits are computed in the autocast dtype
    when autocast is on, else in hidden's dtype (the weight is cast to it), never all at once.
    """
    check_dtype("linear_cross_entropy hidden", hidden)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} must be "
                         f"[vocab, {hidden.shape[-1]}]")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must be hidden's "
                         f"leading dims {tuple(hidden.shape[:-1])}")
    # Custom ops are opaque to autocast: cast here as F.linear would, so forward and backward
    # (which runs outside the autocast region) compute the same logits in the same dtype.
    device_type = hidden.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else hidden.dtype)
    hidden2 = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    tokens = hidden2.shape[0]
    chunk_rows = chunk_rows or default_chunk_rows(tokens, weight.shape[1], weight.shape[0])
    loss, _ = _lce_forward_op(hidden2, weight.to(dtype).contiguous(),
                              labels.reshape(-1).long().contiguous(), int(chunk_rows))
    return loss.view(labels.shape)
