"""Triton kernels check themselves before `kernels: auto` trusts them.

`run_self_checks` runs each kernel in `CHECKS` once per process, forward and backward on a small
input shaped like the model's (its hidden size, head dim, query heads per KV head and window),
in the run's dtype, against the kernel's PyTorch reference (`starcoder.kernels.*_reference`,
computed in fp32 from the same rounded inputs). A kernel whose output or any input gradient is
off by more than `TOLERANCE`, is not finite, or raises (a compile or launch failure) is not
trusted: `uses_triton` / `attention_backend` send its op to the PyTorch path for the rest of the
process, and the reason is logged once. `kernels: triton` is an explicit request and is not
checked; `kernels: torch` runs no kernel.

All ranks agree: the pass flags are all-reduced with MIN over the default process group when
one is initialised, so a kernel that fails on one rank is replaced on all of them (tensor-parallel
ranks that took different paths would compute different numerics). That collective is why the
checks run at model set-up, in `GPT.set_kernels` (`auto` on CUDA), which every rank reaches
together (the trainer's `build_model`, the generation loader), and not lazily at a kernel's first
call in forward: pipeline stages reach their first LayerNorm or loss at different times and some
never call an op at all (only the last stage has a loss), so a lazy all-reduce would pair
unrelated collectives or hang. Outcomes are kept per process and a second `set_kernels` checks
nothing again, so later calls issue no collective either.

Cost: each check compiles its kernels for one small shape (on a GPU, Triton's compile cache makes
most of that a warm-up the run pays anyway) and runs a few small launches; docs/kernels.md gives
the measured start-up time.

To cover a new kernel, add one line to `CHECKS` (its entry point and reference in
`starcoder.kernels`, a function building its inputs, whether it does dot products) and pass its
name to `uses_triton` where the op dispatches.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from starcoder.config import ModelConfig

log = logging.getLogger(__name__)

# Relative Frobenius error allowed against the fp32 reference: twice what tests/kernels allows a
# compiled kernel (docs/kernels.md), so rounding noise on these inputs cannot demote a correct
# kernel, while a wrong one (errors of order 1) cannot pass. Dots: fp32 runs as TF32 on GPUs.
TOLERANCE = {
    True: {torch.float32: 4e-3, torch.float16: 6e-3, torch.bfloat16: 4e-2},  # with dot products
    False: {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2},  # elementwise
}


@dataclass(frozen=True)
class Shapes:
    """What the check inputs take from the model: kernels specialise on these."""
    hidden: int
    head_dim: int
    group: int  # query heads per KV head
    window: int | None

    @classmethod
    def of(cls, m: ModelConfig) -> "Shapes":
        return cls(m.hidden_size, m.head_dim, m.num_attention_heads // m.num_query_groups,
                   m.sliding_window)


# Check inputs: lists of argument tuples, called the same way on the kernel and its reference.
# `r(*shape, scale=1.0)` draws a tensor in the run's dtype that takes a gradient; other tensors
# are fp32.
SEQ = 80  # not a multiple of any tile, longer than the window below


def _attention(s: Shapes, r, g) -> list[tuple]:
    kv = min(s.group, 4)  # the group split of the dK/dV kernel runs at any group size > 1
    q, k, v = r(1, SEQ, 2 * kv, s.head_dim), r(1, SEQ, 2, s.head_dim), r(1, SEQ, 2, s.head_dim)
    window = min(s.window or 24, SEQ // 2)
    # packed documents: one of length 1, one crossing a tile
    documents = torch.tensor([[0] * 30 + [1] + [2] * (SEQ - 31)])
    return [(q, k, v, True, None), (q, k, v, True, window), (q, k, v, True, window, None, documents)]


def _layer_norm(s: Shapes, r, g) -> list[tuple]:
    x, w, b = r(SEQ, s.hidden), r(s.hidden), r(s.hidden)
    return [(x, w, b, 1e-5), (x, w, b, 1e-5, r(SEQ, s.hidden))]


def _bias_gelu(s: Shapes, r, g) -> list[tuple]:
    return [(r(SEQ, s.hidden), r(s.hidden))]


def _bias_dropout_add(s: Shapes, r, g) -> list[tuple]:
    # p = 0: the mask is the kernel's own draw, which the reference cannot repeat; the dropout
    # arithmetic is pinned by tests/kernels/test_bias_dropout_add.py.
    return [(r(SEQ, s.hidden), r(s.hidden), r(SEQ, s.hidden), 0.0)]


def _rope(s: Shapes, r, g) -> list[tuple]:
    angles = torch.rand(SEQ, s.head_dim, generator=g) * (2 * math.pi)
    return [(r(1, SEQ, 4, s.head_dim), r(1, SEQ, 2, s.head_dim), angles.cos(), angles.sin())]


def _cross_entropy(s: Shapes, r, g) -> list[tuple]:
    vocab = 1000
    labels = torch.randint(0, vocab, (SEQ,), generator=g)
    labels[:5] = -100
    return [(r(SEQ, vocab, scale=4.0), labels)]


def _linear_cross_entropy(s: Shapes, r, g) -> list[tuple]:
    vocab = 1000
    labels = torch.randint(0, vocab, (SEQ,), generator=g)
    labels[:5] = -100
    return [(r(SEQ, s.hidden), r(vocab, s.hidden, scale=s.hidden ** -0.5), labels)]


@dataclass(frozen=True)
class Check:
    kernel: str  # entry point in starcoder.kernels
    reference: str  # its reference there
    inputs: Callable[[Shapes, Callable, torch.Generator], list[tuple]]
    dots: bool


CHECKS: dict[str, Check] = {  # keyed by the name the op passes to `uses_triton`
    "flash_attention": Check("flash_attention", "attention_reference", _attention, dots=True),
    "layer_norm": Check("layer_norm", "layer_norm_reference", _layer_norm, dots=False),
    "bias_gelu": Check("bias_gelu", "bias_gelu_reference", _bias_gelu, dots=False),
    "bias_dropout_add": Check("bias_dropout_add", "bias_dropout_add_reference", _bias_dropout_add,
                              dots=False),
    "rope": Check("apply_rope", "rope_reference", _rope, dots=False),
    "cross_entropy": Check("cross_entropy", "cross_entropy_reference", _cross_entropy, dots=False),
    "linear_cross_entropy": Check("linear_cross_entropy", "linear_cross_entropy_reference",
                                  _linear_cross_entropy, dots=True),
}

_outcome: dict[str, bool] = {}  # kernel name -> passed, for this process


def trusted(kernel: str) -> bool:
    """False once `kernel` failed its self-check in this process (unchecked kernels are trusted:
    `kernels: triton`, or `auto` before set-up)."""
    return _outcome.get(kernel, True)


def run_self_checks(device: torch.device, dtype: torch.dtype, shapes: Shapes) -> dict[str, bool]:
    """Check every kernel in `CHECKS` not yet checked in this process, agree on the outcome
    across ranks (a collective: every rank must call this together), log each failure once, and
    return the outcome of all checked kernels."""
    pending = [name for name in CHECKS if name not in _outcome]
    if not pending:
        return dict(_outcome)
    start = time.perf_counter()
    # Set-up may run under no_grad, inference_mode or autocast (a loader); the checks need none.
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        reasons = {name: _failure(CHECKS[name], device, dtype, shapes) for name in pending}
    flags = torch.tensor([reasons[name] is None for name in pending], dtype=torch.int32,
                         device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    for name, ok in zip(pending, flags.tolist()):
        _outcome[name] = bool(ok)
        if not ok:
            log.warning("model.kernels: auto: the Triton %s kernel failed its self-check in %s "
                        "on %s (%s); the PyTorch path serves that op in this process", name,
                        str(dtype).removeprefix("torch."), device.type,
                        reasons[name] or "on another rank")
    log.info("kernel self-check: %d of %d kernels passed in %.1f s", sum(flags.tolist()),
             len(pending), time.perf_counter() - start)
    return dict(_outcome)


def _failure(check: Check, device: torch.device, dtype: torch.dtype, shapes: Shapes) -> str | None:
    """Why `check`'s kernel is not to be trusted, or None."""
    from starcoder import kernels  # lazily: Triton

    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    try:
        kernel, reference = getattr(kernels, check.kernel), getattr(kernels, check.reference)
        tol = TOLERANCE[check.dots][dtype]
        for args in check.inputs(shapes, r, g):
            grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
            args = [a.to(device) if isinstance(a, torch.Tensor) and not d else a
                    for a, d in zip(args, grad)]
            ref_args = [a.detach().float().requires_grad_() if d else a for a, d in zip(args, grad)]
            leaves = [a for a, d in zip(args, grad) if d]
            ref_leaves = [a for a, d in zip(ref_args, grad) if d]
            outs, refs = _as_list(kernel(*args)), _as_list(reference(*ref_args))
            seeds = [torch.randn(o.shape, generator=g).to(device) for o in refs]
            grads = torch.autograd.grad(outs, leaves, [t.to(o.dtype) for t, o in zip(seeds, outs)])
            ref_grads = torch.autograd.grad(refs, ref_leaves, seeds)
            names = [f"output {i}" for i in range(len(outs))] + \
                    [f"gradient {i}" for i in range(len(grads))]
            for what, got, want in zip(names, [*outs, *grads], [*refs, *ref_grads]):
                err = _rel_error(got, want)
                if not err <= tol:  # also catches NaN
                    return f"{what} relative error {err:.2e} > {tol:.1e}"
    except Exception as err:  # a kernel that cannot compile or launch is not trusted either
        return f"{type(err).__name__}: {err}"
    return None


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return math.inf
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
