"""Projected communication and memory per rank for every preset at its own layout on 64 GPUs
(`starcoder.parallel.comm_accounting` formulas, from the configs; nothing runs on GPUs).

    PYTHONPATH=. python benchmarks/bench_comm.py     # a Markdown table for benchmarks/RESULTS.md

Psi (parameters per TP rank) counts the model on the meta device: split tensors / TP, LayerNorms
and biases of row-parallel layers whole. The measured counterpart on tiny configs is
tests/parallel/test_distributed_optimizer.py::test_bytes_sent_and_held_equal_the_formulas.
"""

from __future__ import annotations

from pathlib import Path

import torch

from starcoder.config import load_config
from starcoder.models.gpt import GPT
from starcoder.parallel.comm_accounting import memory_bytes_per_param, step_bytes

GPUS = 64


def psi_and_replicated(cfg, tp: int) -> tuple[int, int]:
    with torch.device("meta"):
        model = GPT(cfg.model, padded_vocab_size=cfg.model.padded_vocab_size(tp))
    whole = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    total = sum(p.numel() for p in model.parameters())
    return (total - whole) // tp + whole, whole


def main() -> None:
    print(f"| preset | layout (64 GPUs) | Psi/rank | DP bytes/step, dist-opt | DP bytes/step, DDP fp32 | "
          f"TP bytes/step | GB/rank dist-opt (6+12/DP) | GB/rank ZeRO-1 fp32 today |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml")):
        if path.stem.startswith("tiny"):
            continue
        cfg = load_config(path)
        m, p, t = cfg.model, cfg.parallel, cfg.train
        tp, dp = p.tensor_parallel, GPUS // p.tensor_parallel
        psi, replicated = psi_and_replicated(cfg, tp)
        accum = t.global_batch_size // (t.micro_batch_size * dp)
        common = dict(psi=psi, replicated=replicated if p.sequence_parallel else 0,
                      b=t.micro_batch_size, s=t.seq_length, h=m.hidden_size, layers=m.num_layers,
                      micro_batches=accum, tp=tp, dp=dp, sp=p.sequence_parallel)
        dist = step_bytes(**common, distributed=True)
        ddp = step_bytes(**common, distributed=False)
        dp_dist = sum(v for (g, _), v in dist.items() if g == "dp")
        dp_ddp = sum(v for (g, _), v in ddp.items() if g == "dp")
        tp_bytes = sum(v for (g, _), v in dist.items() if g == "tp")
        today = psi * (16 - 8 * (dp - 1) / dp)
        print(f"| {path.stem} | TP {tp}{' SP' if p.sequence_parallel else ''} x DP {dp}, "
              f"{accum} micro-batches | {psi / 1e9:.2f}B | {dp_dist / 1e9:.1f} GB | {dp_ddp / 1e9:.1f} GB "
              f"({dp_dist / dp_ddp:.2f}x) | {tp_bytes / 1e9:.1f} GB | "
              f"{psi * memory_bytes_per_param(dp, True) / 2**30:.1f} | {today / 2**30:.1f} |")


if __name__ == "__main__":
    main()
