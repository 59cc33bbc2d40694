"""Peak memory of one training micro-batch per recompute mode, beside the planner's prediction.

For each mode (`model.recompute` none / selective / full, and full with `model.recompute_layers`
half the blocks) one model runs a forward and backward of one micro-batch at the preset's
sequence length, dropout off (the Triton flash-attention path the planner assumes). A warm-up
step first allocates the gradients and compiles the kernels; then, on CUDA,
`torch.cuda.max_memory_allocated` is read around a second step. Reported, in MiB above what the
weights and gradients already hold:
- `kept`: allocated after the forward (the activations saved for backward, logits and losses);
  the planner's `activations` + `logits` terms are its prediction;
- `peak`: the step's peak; predicted by those plus one block's backward working set (the
  planner's workspace term less its flat allowance).
No optimizer runs (its state is the planner's exact term, not measured here).

    python benchmarks/recompute_memory.py [--config starcoderbase-1b] [--set KEY=VALUE ...]
                                          [--out FILE.md]
    python benchmarks/recompute_memory.py --dry-run   # tiny-sc1 on CPU: the logic, no memory

Without CUDA there are no allocator statistics: the measured columns read n/a.
"""

from __future__ import annotations

import argparse
import time

import torch

from starcoder.config import load_config
from starcoder.models import GPT
from starcoder.planning import plan_layout
from starcoder.planning.memory import WORKSPACE_BYTES

MiB = 2 ** 20
NO_DROPOUT = ["model.attention_dropout=0", "model.hidden_dropout=0", "model.embedding_dropout=0"]


def modes(num_layers: int) -> list[tuple[str, list[str]]]:
    half = num_layers // 2
    return [("none", ["model.recompute=none"]), ("selective", ["model.recompute=selective"]),
            ("full", ["model.recompute=full"]),
            (f"full, first {half}", ["model.recompute=full", f"model.recompute_layers={half}"])]


def predicted(cfg) -> tuple[int, int]:
    """(kept, peak) bytes above weights and gradients, from the planner."""
    terms = plan_layout(cfg).terms
    kept = terms["activations"] + terms["logits"]
    return kept, kept + terms["workspace"] - WORKSPACE_BYTES


def measure(model: GPT, ids: torch.Tensor, device: torch.device) -> tuple[int | None, int | None]:
    """(kept, peak) bytes above what is allocated before the forward; None without CUDA."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    loss = model(ids[:, :-1], ids[:, 1:]).mean()
    kept = torch.cuda.memory_allocated(device) - base if cuda else None
    loss.backward()
    if cuda:
        torch.cuda.synchronize(device)
        return kept, torch.cuda.max_memory_allocated(device) - base
    return None, None


def run(config: str, sets: list[str], device: torch.device) -> list[dict]:
    base = load_config(config, [*sets, *NO_DROPOUT])
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with torch.device(device):
        model = GPT(base.model).to(dtype).train()
    model.set_kernels(base.model.kernels, device)
    t = base.train
    ids = torch.randint(0, base.model.vocab_size, (t.micro_batch_size, t.seq_length + 1), device=device)
    rows = []
    for name, mode_sets in modes(base.model.num_layers):
        cfg = load_config(config, [*sets, *NO_DROPOUT, *mode_sets])
        if device.type == "cpu":  # what the model computes in, for the planner too
            cfg.train.precision = "fp32"
        model.cfg.recompute, model.cfg.recompute_layers = cfg.model.recompute, cfg.model.recompute_layers
        start = time.perf_counter()
        measure(model, ids, device)  # warm-up: gradients allocated, kernels compiled
        for p in model.parameters():
            p.grad.zero_()
        kept, peak = measure(model, ids, device)
        rows.append({"mode": name, "kept": kept, "peak": peak, "predicted": predicted(cfg),
                     "seconds": time.perf_counter() - start})
    return rows


def table(rows: list[dict], config: str, device: torch.device) -> str:
    def mib(x):
        return "n/a" if x is None else f"{x / MiB:,.0f}"

    def ratio(a, b):
        return "n/a" if a is None else f"{b / a:.2f}"
    lines = [f"{config} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}: "
             "MiB above weights and gradients, one micro-batch",
             "",
             "| recompute | kept | planner | planner / kept | peak | planner | planner / peak | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pk, pp = r["predicted"]
        lines.append(f"| {r['mode']} | {mib(r['kept'])} | {mib(pk)} | {ratio(r['kept'], pk)} | "
                     f"{mib(r['peak'])} | {mib(pp)} | {ratio(r['peak'], pp)} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="starcoderbase-1b")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny-sc1 at 64 tokens on CPU: runs every step but measures nothing")
    parser.add_argument("--out", help="append the table to this markdown file")
    args = parser.parse_args()
    config, sets = args.config, args.sets
    if args.dry_run:
        config, sets = "tiny-sc1", ["train.seq_length=64", "train.micro_batch_size=2", "model.kernels=torch", *sets]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    text = table(run(config, sets, device), config, device)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
