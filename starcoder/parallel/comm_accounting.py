"""Communication accounting: what each rank sends, by process group and collective, and the
formulas it should match.

`CommAccounting(groups)` hooks the `torch.distributed` collectives while it is entered and records
every call: group name, collective, dtype, the full tensor's bytes B and the group size n. Bytes
sent per rank follow the ring model (what NCCL's ring algorithms send; the distributed optimizer's
gloo all-to-all sends the same):

| collective                         | bytes sent per rank |
|------------------------------------|---------------------|
| all-reduce                         | 2 (n-1)/n x B       |
| reduce-scatter, all-gather, all-to-all | (n-1)/n x B     |
| broadcast                          | (n-1)/n x B         |
| send                               | B                   |

B is the whole tensor: the input of a reduce-scatter or all-to-all, the output of an all-gather.
The formulas below give the same numbers from a config alone (the planner reuses them).
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# name -> (which tensor argument is B, B's multiple of that tensor, ring factor given n)
_RING = {
    "all_reduce": (0, 1, lambda n: 2 * (n - 1) / n),
    "all_gather_single": (0, 1, lambda n: (n - 1) / n),
    "all_gather_into_tensor": (0, 1, lambda n: (n - 1) / n),
    "reduce_scatter_single": (1, 1, lambda n: (n - 1) / n),
    "reduce_scatter_tensor": (1, 1, lambda n: (n - 1) / n),
    "all_to_all_single": (1, 1, lambda n: (n - 1) / n),
    "all_gather": (1, None, lambda n: (n - 1) / n),  # list output: B = n x the input
    "broadcast": (0, 1, lambda n: (n - 1) / n),
    "send": (0, 1, lambda n: 1.0),
    "isend": (0, 1, lambda n: 1.0),
}
KINDS = {"all_reduce": "all_reduce", "all_gather_single": "all_gather",
         "all_gather_into_tensor": "all_gather", "all_gather": "all_gather",
         "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
         "all_to_all_single": "reduce_scatter", "broadcast": "broadcast", "send": "send",
         "isend": "send"}


@dataclass
class Call:
    group: str
    kind: str  # all_reduce | all_gather | reduce_scatter (an all-to-all counts as one) | ...
    dtype: torch.dtype
    numel: int  # of the whole tensor
    size: int  # ranks in the group
    sent: float  # bytes this rank sends (ring model)


class CommAccounting(contextlib.ContextDecorator):
    """Record this rank's collectives while entered. `groups`: {name: process group}; the default
    group is "world", any other "other"."""

    def __init__(self, groups: dict[str, object] | None = None):
        self.names = {id(g): name for name, g in (groups or {}).items() if g is not None}
        self.calls: list[Call] = []
        self._saved: list = []

    def __enter__(self):
        for name in _RING:
            # Deprecated names forward to the new ones inside c10d: hook only one of each pair.
            if name.endswith(("_into_tensor", "_tensor")) and hasattr(c10d, name.replace(
                    "_into_tensor", "_single").replace("_tensor", "_single")):
                continue
            for module in (dist, c10d):
                if hasattr(module, name):
                    self._saved.append((module, name, getattr(module, name)))
        hooked = {}
        for module, name, fn in self._saved:
            # One wrapper per name in both modules: `dist.P2POp` checks `op` against c10d's isend.
            setattr(module, name, hooked.setdefault(name, self._wrap(name, fn)))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved = []
        return False

    def _wrap(self, name: str, fn):
        arg, _, factor = _RING[name]
        signature = inspect.signature(fn)

        def hooked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            group = bound.get("group")
            n = dist.get_world_size(group)
            tensor = list(bound.values())[arg]
            numel = tensor.numel() * (n if name == "all_gather" else 1)
            self.calls.append(Call(self.names.get(id(group), "world" if group is None else "other"),
                                   KINDS[name], tensor.dtype, numel, n,
                                   factor(n) * numel * tensor.element_size()))
            return fn(*args, **kwargs)

        return hooked

    def sent(self) -> dict[tuple[str, str], float]:
        """{(group, kind): bytes this rank sent}."""
        out: dict = defaultdict(float)
        for call in self.calls:
            out[call.group, call.kind] += call.sent
        return dict(out)


# --------------------------------------------------------------------------------------------
# Formulas (bytes per rank)


def ring(kind: str, n: int, nbytes: float) -> float:
    return 0.0 if n == 1 else (2 if kind == "all_reduce" else 1) * (n - 1) / n * nbytes


def dp_step_bytes(psi: int, dp: int, distributed: bool, grad_bytes: int = 4,
                  param_bytes: int = 2) -> dict[str, float]:
    """Data-parallel bytes per step for `psi` parameters per TP x PP rank: a reduce-scatter of the
    gradients and an all-gather of the weights (distributed optimizer), or an all-reduce."""
    if distributed:
        return {"reduce_scatter": ring("reduce_scatter", dp, psi * grad_bytes),
                "all_gather": ring("all_gather", dp, psi * param_bytes)}
    return {"all_reduce": ring("all_reduce", dp, psi * grad_bytes)}


def tp_micro_batch_bytes(b: int, s: int, h: int, layers: int, tp: int, sp: bool,
                         act_bytes: int = 2) -> dict[str, float]:
    """TP activation bytes per micro-batch: per block 2 all-reduces forward and 2 backward of
    b x s x h, or under SP the 4 all-gathers and 4 reduce-scatters that replace them, plus 2
    all-gathers in backward of the saved input shards (attention input, fc_in input: the
    column-parallel linears save 1/tp of the sequence); plus the embedding's reduction and the
    output layer's input (an all-reduce in backward without SP, an all-gather forward and
    reduce-scatter backward with it)."""
    x = b * s * h * act_bytes
    if sp:  # embedding: rs fwd, ag bwd; output layer: ag fwd, rs bwd
        return {"all_gather": (6 * layers + 2) * ring("all_gather", tp, x),
                "reduce_scatter": (4 * layers + 2) * ring("reduce_scatter", tp, x)}
    return {"all_reduce": (4 * layers + 2) * ring("all_reduce", tp, x)}


def memory_bytes_per_param(dp: int, distributed: bool, param_bytes: int = 2,
                           grad_bytes: int = 4) -> float:
    """Weights, gradient buffer, then fp32 main weights (none when the weights are fp32: they are
    their own main copy), two fp32 Adam moments and, when reducing in bf16, the fp32 copy of the
    gradients the step uses, for the owned 1/DP: Megatron's 6 + 12/DP bytes per parameter (bf16
    weights, fp32 gradients), 4 + 16/DP with bf16 reduction; 16 without sharding."""
    owned = (0 if param_bytes == 4 else 4) + 8 + (0 if grad_bytes == 4 else 4)
    return param_bytes + grad_bytes + owned / (dp if distributed else 1)


def step_bytes(*, psi: int, replicated: int, b: int, s: int, h: int, layers: int,
               micro_batches: int, tp: int, dp: int, sp: bool, distributed: bool,
               act_bytes: int = 2, grad_bytes: int = 4) -> dict[tuple[str, str], float]:
    """Every term one training step sends per rank, {(group, kind): bytes}, as the trainer does it:
    - dp: the gradient reduction and weight gather (`dp_step_bytes`), two fp64 scalars (token
      count, loss) and, sharded, the fp32 squared norm;
    - tp: the activation collectives per micro-batch (`tp_micro_batch_bytes`), the vocabulary-
      parallel cross-entropy (an all-reduce of b x s fp32 row maxima, then of the b x s sums of
      exponentials and target logits), the fp32 all-reduce of the `replicated` elements whose
      copies see partial gradients, and the squared norm;
    - world: the non-finite flag (one fp32).
    `psi`: parameters per TP x PP rank (as held, i.e. with bucket padding)."""
    out: dict = defaultdict(float)
    for kind, nbytes in dp_step_bytes(psi, dp, distributed, grad_bytes, act_bytes).items():
        out["dp", kind] += nbytes
    out["dp", "all_reduce"] += 2 * ring("all_reduce", dp, 8) + (ring("all_reduce", dp, 4) if distributed else 0)
    for kind, nbytes in tp_micro_batch_bytes(b, s, h, layers, tp, sp, act_bytes).items():
        out["tp", kind] += micro_batches * nbytes
    out["tp", "all_reduce"] += micro_batches * ring("all_reduce", tp, 3 * b * s * 4)
    out["tp", "all_reduce"] += ring("all_reduce", tp, replicated * 4) + ring("all_reduce", tp, 4)
    out["world", "all_reduce"] += ring("all_reduce", tp * dp, 4)
    return {k: v for k, v in out.items() if v}
