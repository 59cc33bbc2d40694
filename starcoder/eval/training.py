"""HumanEval during training (`train.eval_humaneval_every: N`): greedy pass@1 of the live model.

Problems are split across data-parallel ranks; the ranks of one tensor-parallel group generate
together, and its first rank executes the programs in the sandbox. Counts are summed over the
world and rank 0 logs `humaneval_pass@1` with the trainer's metrics (metrics.jsonl, TensorBoard,
wandb). The sandbox is checked when the hook is made, before step 1.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from starcoder.eval.humaneval import STOP_SEQUENCES, load_problems, program
from starcoder.eval.sandbox import Sandbox
from starcoder.generation import Generator

MAX_NEW_TOKENS = 128
BATCH_SIZE = 8


class HumanEvalHook:
    def __init__(self, trainer):
        t = trainer.cfg.train
        self.trainer, self.every = trainer, t.eval_humaneval_every
        self.sandbox = Sandbox()
        if trainer.grid.tp_rank == 0:
            self.sandbox.check()
        problems = load_problems(t.eval_humaneval_limit)
        self.count = len(problems)
        self.problems = problems[trainer.grid.dp_rank:: trainer.grid.dp]

    def __call__(self, step: int) -> None:
        if step % self.every:
            return
        tr = self.trainer
        start = time.perf_counter()
        model = tr.model
        model.eval()
        generator = Generator(model, tr.tokenizer)
        with torch.no_grad(), _autocast(tr.precision, tr.device):
            completions = generator.complete([p["prompt"].strip() for p in self.problems],
                                             MAX_NEW_TOKENS, stop=STOP_SEQUENCES, batch_size=BATCH_SIZE)
        model.train()
        passed = 0
        if tr.grid.tp_rank == 0:
            programs = [program(p, c.prompt + c.text) for p, c in zip(self.problems, completions)]
            passed = sum(r.passed for r in self.sandbox.run_many(programs))
        total = torch.tensor([passed], dtype=torch.float64, device=tr.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        tr.logger.log({"step": step, "humaneval_pass@1": total.item() / self.count,
                       "humaneval_problems": self.count,
                       "humaneval_seconds": time.perf_counter() - start})
        tr._restart_interval()  # throughput counts training only


def _autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
