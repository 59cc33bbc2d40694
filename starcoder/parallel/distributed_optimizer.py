"""AdamW over fp32 main weights, optionally sharded over data parallel (Megatron's distributed
optimizer).

The model's weights live in a `GradBuffer` (bf16, fp16 or fp32), its gradients accumulate in the
buffer's `grad` (fp32 by default). This rank owns `bucket.shard` of every bucket: all of it
without sharding, an even 1/DP slice by element with it. The owned range of each parameter is a
*piece*; torch's AdamW steps the pieces:

- a piece's main weight is an fp32 copy of the model weight when the model is in bf16 or fp16,
  and a view of the weight itself when the model is fp32 (no copy needed);
- its gradient is a view of the fp32 gradient buffer (a cast copy when reducing in bf16);
- Adam's moments exist for pieces only: 12 bytes per owned parameter.

After the step the pieces are written back into the model buffer (cast) and, when sharded, each
bucket is all-gathered so every rank has the whole updated model. AdamW is element-wise, so a
sharded step gives exactly the unsharded step's values for the same gradients.

Checkpoints stay layout-free: `full_state` gathers, per parameter and in the parameter's
(tensor-parallel local) shape, the fp32 main weights and Adam state; `load_full_state` takes them
back. No uneven shard is ever saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from starcoder.parallel.collectives import _all_gather_single
from starcoder.parallel.grad_buffer import GradBuffer
from starcoder.parallel.grads import tp_copies
from starcoder.parallel.grid import Grid

ADAM_STATE = ("exp_avg", "exp_avg_sq")


@dataclass(eq=False)
class Piece:
    param: nn.Parameter
    bucket: object
    start: int  # [start, end) in the bucket's flat buffers, inside the bucket's shard
    end: int
    main: torch.Tensor  # fp32, 1-D

    def grad(self) -> torch.Tensor:
        return self.bucket.grad[self.start:self.end]


class DistributedOptimizer:
    """Holds the `GradBuffer` and an AdamW over the owned pieces. `param_groups` is AdamW's (the
    trainer sets the learning rate there)."""

    def __init__(self, buffer: GradBuffer, groups: list[dict], grid: Grid, model_dtype: torch.dtype,
                 overlap_param_gather: bool = False, **adam_options):
        self.buffer, self.grid, self.overlap_param_gather = buffer, grid, overlap_param_gather
        self.pieces: list[Piece] = []
        adam_groups = []
        for group in groups:
            pieces = []
            for p in group["params"]:
                bucket = buffer.bucket_of[id(p)]
                a, b = bucket.range_of(p)
                lo, hi = max(a, bucket.shard[0]), min(b, bucket.shard[1])
                if lo >= hi:
                    continue
                flat = bucket.data[lo:hi].float()  # fp32 before cast_params: a view
                main = flat if model_dtype == torch.float32 else flat.clone()
                pieces.append(Piece(p, bucket, lo, hi, main))
            self.pieces += pieces
            adam_groups.append({**group, "params": [x.main for x in pieces]})
        buffer.cast_params(model_dtype)
        self.adam = torch.optim.AdamW(adam_groups, **adam_options)
        self.param_groups = self.adam.param_groups

    # ----------------------------------------------------------------------------------------
    # A step

    def grads(self) -> list[torch.Tensor]:
        """The reduced gradients of the owned pieces (views of the buffer)."""
        return [piece.grad() for piece in self.pieces]

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm (fp32): each owned element counted once over data parallel, each
        tensor-parallel copy once (by the first rank of its copies), the last pipeline stage's
        copy of a tied embedding not at all, summed over tp/dp/pp."""
        grid = self.grid
        device = self.buffer.buckets[0].grad.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        for piece in self.pieces:
            if grid.tp_rank % tp_copies(piece.param) == 0 and not getattr(piece.param, "pipeline_copy", False):
                total += piece.grad().float().pow(2).sum()
        dims = (("tp", grid.tp), ("pp", grid.pp)) + ((("dp", grid.dp),) if self.buffer.shard else ())
        for dim, size in dims:
            if size > 1:
                dist.all_reduce(total, group=grid.group(dim))
        return total.sqrt()

    def scale_grads(self, factor) -> None:
        """Multiply the reduced gradients by `factor` (a float or a 0-d tensor)."""
        grads = self.grads()
        if grads:
            torch._foreach_mul_(grads, factor)

    @torch.no_grad()
    def step(self) -> None:
        for piece in self.pieces:
            grad = piece.grad()
            piece.main.grad = grad if grad.dtype == torch.float32 else grad.float()
        self.adam.step()
        for piece in self.pieces:
            piece.main.grad = None
            if piece.main.data_ptr() != piece.bucket.data[piece.start:piece.end].data_ptr():
                piece.bucket.data[piece.start:piece.end].copy_(piece.main)
        self.buffer.start_param_gather()
        if not self.overlap_param_gather:  # else each module waits for its own bucket in forward
            self.buffer.wait_param_gather()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.buffer.zero_grad()

    # ----------------------------------------------------------------------------------------
    # Checkpoints: per parameter, in the parameter's shape

    def full_state(self, model: nn.Module) -> tuple[dict, dict]:
        """({name: fp32 main weight}, {name: {"exp_avg", "exp_avg_sq", "step"}}) for every
        parameter, whole on every data-parallel rank (one gather per bucket and tensor; collective
        over data parallel). State that does not exist yet is created as zeros, step 0."""
        self.buffer.wait_param_gather()
        step = self._step()
        flats = {key: [self._gather(bucket, key) for bucket in self.buffer.buckets]
                 for key in ("main", *ADAM_STATE)}
        weights, states = {}, {}
        for name, p in model.named_parameters():
            if id(p) not in self.buffer.bucket_of:
                continue
            bucket = self.buffer.bucket_of[id(p)]
            i = next(j for j, b in enumerate(self.buffer.buckets) if b is bucket)
            a, b = bucket.range_of(p)
            weights[name] = flats["main"][i][a:b].view(p.shape)
            states[name] = {key: flats[key][i][a:b].view(p.shape) for key in ADAM_STATE}
            states[name]["step"] = step.clone()
        return weights, states

    @torch.no_grad()
    def load_full_state(self, weights: dict, states: dict, model: nn.Module) -> None:
        """Take back what `full_state` returned (after a checkpoint load wrote into it)."""
        by_param = {id(p): name for name, p in model.named_parameters()}
        for piece in self.pieces:
            name = by_param[id(piece.param)]
            a, _ = piece.bucket.range_of(piece.param)
            part = slice(piece.start - a, piece.end - a)
            piece.main.copy_(weights[name].reshape(-1)[part])
            state = self.adam.state[piece.main]
            state["step"] = states[name]["step"].clone().to(torch.float32)
            for key in ADAM_STATE:
                state[key] = states[name][key].reshape(-1)[part].clone()
        for name, p in model.named_parameters():
            if name in weights:
                p.data.copy_(weights[name])

    def _step(self) -> torch.Tensor:
        for piece in self.pieces:
            if "step" in self.adam.state[piece.main]:
                return self.adam.state[piece.main]["step"].detach().cpu()
        return torch.tensor(0.0)

    @torch.no_grad()
    def _gather(self, bucket, key: str) -> torch.Tensor:
        """The bucket's whole fp32 `key` ("main" or an Adam state) from the owners' slices."""
        lo, hi = bucket.shard
        mine = torch.zeros(hi - lo, dtype=torch.float32, device=bucket.grad.device)
        for piece in self.pieces:
            if piece.bucket is bucket:
                value = piece.main if key == "main" else self.adam.state[piece.main].get(key)
                if value is not None:
                    mine[piece.start - lo:piece.end - lo] = value
        if not self.buffer.shard:
            return mine
        whole = torch.empty(bucket.numel, dtype=torch.float32, device=mine.device)
        _all_gather_single(whole, mine, group=self.buffer.group)
        return whole

    # ----------------------------------------------------------------------------------------
    # Accounting

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: model weights, gradient buffer, fp32 main weights (copies only;
        zero when the model is fp32) and Adam moments."""
        buckets = self.buffer.buckets
        copies = [x.main for x in self.pieces
                  if x.main.data_ptr() != x.bucket.data[x.start:x.end].data_ptr()]
        return {"weights": sum(b.data.numel() * b.data.element_size() for b in buckets),
                "grads": sum(b.grad.numel() * b.grad.element_size() for b in buckets),
                "main_weights": sum(m.numel() * 4 for m in copies),
                "adam": sum(x.main.numel() * 4 * len(ADAM_STATE) for x in self.pieces)}
