"""DPO (Rafailov et al. 2023) on the training stack: the sigmoid loss on summed response log-probs.

A micro-batch of m preference pairs has 2m rows, chosen in row 2b and rejected in row 2b + 1
(starcoder.data.packing.PairBatches). A sequence's log-prob is the sum of its token log-probs
under the loss mask (the response and its closing EOS), -sum(per-token loss x mask). With
D = (pi_c - ref_c) - (pi_r - ref_r) and cDPO's label smoothing e, a pair's loss is

    -(1 - e) log sigma(beta D) - e log sigma(-beta D),

and the step's loss the mean over the global batch's pairs: the trainer weights each rank's
pair-sum as it weights token sums (its share of the global count of pairs). The reference:
- `frozen`: the initial policy beside the training one, in eval mode without gradients; with LoRA
  the model itself under `adapters_off` (the frozen base), so no second copy exists;
- `precomputed`: one forward-only pass of that reference over every training pair before step 1
  (pairs split over data-parallel ranks, then summed), kept in memory by pair number; with
  `train.eval_every` also over the validation pairs that validation reads, in a table of their
  own. A resumed run computes them again from the same initial weights: the same numbers, no file
  to keep in sync.

Metrics (TRL's names; means over the global batch's pairs): `rewards/chosen` beta (pi_c - ref_c),
`rewards/rejected`, `rewards/accuracies` (chosen reward above rejected), `rewards/margins`,
`logps/chosen`, `logps/rejected`. Validation (`evaluate`, on the validation split's pairs) logs
the mean pair loss as `val_loss` and these metrics as `val_rewards/chosen`, ... (TRL's
`eval_loss`, `eval_rewards/chosen`, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from starcoder.config import Config
from starcoder.finetune.lora import adapters_off

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def dpo_config(cfg: Config) -> Config:
    """`cfg` with every dropout off (the model's and LoRA's), as TRL's `disable_dropout`: the
    policy and reference log-probs of a pair must come from the same deterministic function."""
    m = dataclasses.replace(cfg.model, attention_dropout=0.0, hidden_dropout=0.0,
                            embedding_dropout=0.0)
    return dataclasses.replace(cfg, model=m,
                               finetune=dataclasses.replace(cfg.finetune, lora_dropout=0.0))


def sequence_logps(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of each row (float64 [rows]) from per-token losses [rows, seq]."""
    return -(losses * mask).sum(dim=1, dtype=torch.float64)


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float, smoothing: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses and the sums of `METRICS` over the pairs, from sequence log-probs [2m]
    (chosen at even, rejected at odd rows) of the policy and the reference."""
    pi_c, pi_r = policy[0::2], policy[1::2]
    ref_c, ref_r = reference[0::2], reference[1::2]
    d = (pi_c - ref_c) - (pi_r - ref_r)
    losses = -(1 - smoothing) * F.logsigmoid(beta * d) - smoothing * F.logsigmoid(-beta * d)
    with torch.no_grad():
        chosen, rejected = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
        sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).double().sum(),
                            (chosen - rejected).sum(), pi_c.sum(), pi_r.sum()])
    return losses, sums


class DPO:
    """The trainer's DPO part: the reference and the per-step metric sums.

    `model`: the policy (unwrapped); `build_reference`: a callable giving the initial policy as a
    fresh model (used when there is no LoRA to switch off)."""

    def __init__(self, cfg: Config, model: torch.nn.Module,
                 build_reference: Callable[[], torch.nn.Module], device: torch.device):
        f = cfg.finetune
        self.beta, self.smoothing, self.device = f.dpo_beta, f.dpo_label_smoothing, device
        self.lora = bool(f.lora_rank)
        self.model = model
        self.reference = None if self.lora else build_reference().eval().requires_grad_(False)
        # precomputed: float64 [pairs, 2], reference log-probs by pair number, of the training
        # split and of the validation pairs
        self.table = self.valid_table = None
        self.sums = torch.zeros(len(METRICS), dtype=torch.float64, device=device)

    @contextlib.contextmanager
    def _reference(self):
        """The reference model, in eval mode, without gradients."""
        if self.reference is not None:
            with torch.no_grad():
                yield self.reference
            return
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), adapters_off(self.model):
                yield self.model
        finally:
            self.model.train(training)

    def reference_logps(self, mb: dict, tokens: torch.Tensor, mask: torch.Tensor,
                        table: torch.Tensor | None) -> torch.Tensor:
        """The reference's sequence log-probs of the micro-batch: looked up by pair number in
        `table` (precomputed), else computed now."""
        if table is not None:
            return table[mb["pair_index"].to(self.device)].reshape(-1)
        with self._reference() as ref:
            return sequence_logps(ref(tokens[:, :-1], tokens[:, 1:]), mask)

    def precompute(self, train, valid, micro: int, dp_rank: int, dp_size: int, group) -> None:
        """The reference log-probs of every training pair (`train`, a PairBatches) and, given
        `valid` (its PairBatches and the pair numbers validation reads), of those validation
        pairs; then the reference copy is freed."""
        self.table = self._reference_table(train, range(len(train)), micro, dp_rank, dp_size, group)
        if valid is not None:
            self.valid_table = self._reference_table(*valid, micro, dp_rank, dp_size, group)
        self.reference = None  # the pass is done: the copy is not needed any more

    def _reference_table(self, dataset, pairs, micro: int, dp_rank: int, dp_size: int, group
                         ) -> torch.Tensor:
        """float64 [len(dataset), 2]: the reference log-probs of `pairs` (pair numbers of
        `dataset`), NaN for the others; this data-parallel rank computes every dp_size-th of
        the distinct pairs in micro-batches of `micro`, then the ranks' tables are summed."""
        table = torch.zeros(len(dataset), 2, dtype=torch.float64, device=self.device)
        distinct = sorted(set(pairs))
        mine = distinct[dp_rank::dp_size]
        for start in range(0, len(mine), micro):
            index = mine[start:start + micro]
            mb = dataset.batch(index)
            tokens, mask = mb["tokens"].to(self.device), mb["loss_mask"].to(self.device)
            with self._reference() as ref:
                logps = sequence_logps(ref(tokens[:, :-1], tokens[:, 1:]), mask)
            table[torch.tensor(index, device=self.device)] = logps.reshape(-1, 2)
        if dp_size > 1:
            dist.all_reduce(table, group=group)
        missing = torch.ones(len(dataset), dtype=torch.bool, device=self.device)
        missing[torch.tensor(distinct, dtype=torch.int64, device=self.device)] = False
        return table.masked_fill_(missing[:, None], math.nan)  # a lookup of one would show

    def loss_sum(self, token_losses: torch.Tensor, mb: dict, tokens: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """The sum of the micro-batch's pair losses (to backpropagate); adds its metric sums."""
        policy = sequence_logps(token_losses, mask)
        losses, sums = dpo_losses(policy, self.reference_logps(mb, tokens, mask, self.table),
                                  self.beta, self.smoothing)
        self.sums += sums
        return losses.sum()

    def metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor], pairs: float) -> dict:
        """The step's metrics (means over the global batch's `pairs`), then a fresh sum."""
        sums = reduce(self.sums)
        self.sums = torch.zeros_like(self.sums)
        return {name: value / max(pairs, 1.0) for name, value in zip(METRICS, sums.tolist())}

    @torch.no_grad()
    def evaluate(self, batches, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """`val_loss` (the mean pair loss) and `val_` + each of `METRICS` (means) over the pairs
        of `batches` (this rank's validation micro-batches; `reduce` sums over the ranks)."""
        training = self.model.training
        self.model.eval()
        totals = torch.zeros(2 + len(METRICS), dtype=torch.float64, device=self.device)
        try:
            for mb in batches:
                tokens = mb["tokens"].to(self.device)
                mask = mb["loss_mask"].to(self.device)
                policy = sequence_logps(self.model(tokens[:, :-1], tokens[:, 1:]), mask)
                reference = self.reference_logps(mb, tokens, mask, self.valid_table)
                losses, sums = dpo_losses(policy, reference, self.beta, self.smoothing)
                pairs = totals.new_tensor([len(losses)])
                totals += torch.cat([pairs, losses.sum().reshape(1), sums])
        finally:
            self.model.train(training)
        pairs, *sums = reduce(totals).tolist()
        means = [value / pairs if pairs else math.nan for value in sums]
        return dict(zip(["val_loss", *(f"val_{name}" for name in METRICS)], means))
