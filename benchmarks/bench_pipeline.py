"""Pipeline bubble and first-stage activation memory of the schedules the trainer uses, measured
with `torch.distributed.pipelining` on P gloo processes whose stages take fixed times.

Each stage's work is sleeps inside custom autograd functions, so the oversubscribed CPU cores do
not blur the schedule: forward T_F, input-gradient T_B, weight-gradient T_W. The weight path is
its own function on a detached input (`WeightGrad`), so a zero-bubble schedule can defer exactly
that sleep; a full backward runs both. With V chunks per rank each chunk sleeps 1/V of the times.

Per rank, the bubble fraction is 1 - (time spent in stage work) / (step wall time), averaged over
ranks and taken from the best of `--steps` timed steps (after one warm-up step, which infers
shapes). Theory: (P-1)/(m+P-1) for GPipe and 1F1B, (P-1)/(V·m+P-1) for interleaved 1F1B, and for
zero-bubble Qi et al. (2023)'s bubble time (P-1)(T_F+T_B-T_W) for ZB-H1 against
(P-1)(T_F+T_B+T_W) for 1F1B, as a fraction of bubble + m(T_F+T_B+T_W).

Also counted: backward calls of each function per step on a non-first stage, and the peak bytes
of activations the first stage holds for backward (saved-tensor hooks; one micro-batch saves a
known size, so peak / size = micro-batches in flight: at most P for 1F1B, m for GPipe).

    python benchmarks/bench_pipeline.py [--pp 4] [--microbatches 4 8 16] [--ms 20] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

HIDDEN = 64  # floats per sample: small, so that communication stays far below the sleeps
MICRO_BATCH = 4
SCHEDULES = [  # (label, trainer's pipeline_schedule, V)
    ("gpipe", "gpipe", 1),
    ("1f1b", "1f1b", 1),
    ("interleaved V2", "interleaved", 2),
    ("zero_bubble V1 (InterleavedZB)", "zero_bubble", 1),
    ("zero_bubble V2 (ZB-V)", "zero_bubble", 2),
]

BUSY = {"seconds": 0.0}
CALLS = {"input_backward": 0, "weight_backward": 0}


def work(seconds: float) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    BUSY["seconds"] += time.perf_counter() - start


class InputPath(torch.autograd.Function):
    """Forward T_F, backward (the input gradient) T_B; saves its input like a real layer."""

    @staticmethod
    def forward(ctx, x, t_f, t_b):
        work(t_f)
        ctx.t_b = t_b
        ctx.save_for_backward(x)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        CALLS["input_backward"] += 1
        work(ctx.t_b)
        return grad.contiguous(), None, None  # a sum loss gives an expanded gradient


class WeightGrad(torch.autograd.Function):
    """The weight path only (its input is detached): backward T_W, the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, t_w):
        ctx.t_w = t_w
        ctx.save_for_backward(x)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        CALLS["weight_backward"] += 1
        work(ctx.t_w)
        (x,) = ctx.saved_tensors
        return None, (grad * x).sum(0), None


class TimedStage(nn.Module):
    def __init__(self, t_f: float, t_b: float, t_w: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(HIDDEN))
        self.times = t_f, t_b, t_w

    def forward(self, x):
        t_f, t_b, t_w = self.times
        return InputPath.apply(x, t_f, t_b) + WeightGrad.apply(x.detach(), self.weight, t_w)


class SavedBytes:
    """Live and peak bytes of tensors saved for backward, via saved-tensor hooks: a saved
    tensor counts until autograd drops the holder the pack hook returned."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        holder = _Holder([tensor])
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(holder, self._free, size)
        return holder

    def _free(self, size):
        self.live -= size

    @staticmethod
    def unpack(holder):
        return holder[0]


class _Holder(list):
    """A list that can be weakly referenced."""


def _worker(rank, pp, args, init, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from starcoder.config import ParallelConfig
    from starcoder.parallel.pipeline import build_schedule, rank_stages
    from torch.distributed.pipelining import PipelineStage

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=pp)
    pp_group = dist.new_group(list(range(pp)))
    t = args.ms / 1000.0
    results = []
    for label, name, v in SCHEDULES:
        for m in args.microbatches:
            if rank == 0:
                print(f"{label}, m {m}", flush=True)
            parallel = ParallelConfig(pipeline_parallel=pp, virtual_pipeline=v, pipeline_schedule=name)
            stage_ids = rank_stages(parallel, rank)
            stages = []
            for s in stage_ids:
                module = TimedStage(t / v, t / v, t / v)
                stages.append(PipelineStage(module, s, pp * v, torch.device("cpu"), group=pp_group))
            schedule = build_schedule(name, stages, m, lambda out, target: out.sum(), pp, v)
            first, last = 0 in stage_ids, pp * v - 1 in stage_ids
            # Requiring a gradient makes stage 0 run its input-gradient work too, like the others.
            batch = torch.randn(m * MICRO_BATCH, HIDDEN, requires_grad=True)
            best = None
            for step in range(args.steps + 1):
                BUSY["seconds"] = 0.0
                for key in CALLS:
                    CALLS[key] = 0
                saved = SavedBytes()
                dist.barrier()
                start = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                    schedule.step(*([batch] if first else []), target=batch if last else None)
                dist.barrier()
                wall = time.perf_counter() - start
                if step and (best is None or wall < best["wall"]):
                    best = {"wall": wall, "busy": BUSY["seconds"], "calls": dict(CALLS),
                            "peak_saved": saved.peak}
            results.append({"schedule": label, "v": v, "m": m, "rank": rank, **best})
            del schedule, stages
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
    time.sleep(0.2)  # gloo's exit-time crash (../shared/reference/torch-distributed-cpu.md)


def theory(label: str, v: int, m: int, pp: int) -> float:
    if label.startswith("zero_bubble"):
        t_f = t_b = t_w = 1.0
        bubble = (pp - 1) * (t_f + t_b - t_w)
        return bubble / (bubble + m * (t_f + t_b + t_w))
    return (pp - 1) / (v * m + pp - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--ms", type=float, default=20.0, help="T_F = T_B = T_W per stage, ms")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (best counts)")
    parser.add_argument("--plot", default="benchmarks/bench_pipeline.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args.pp, args, os.path.join(tmp, "init"), tmp), nprocs=args.pp)
        per_rank = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.pp)]
    rows = []
    for i, first in enumerate(per_rank[0]):
        ranks = [pr[i] for pr in per_rank]
        bubble = sum(1 - r["busy"] / r["wall"] for r in ranks) / len(ranks)
        rows.append({**first, "bubble": bubble, "theory": theory(first["schedule"], first["v"],
                                                                 first["m"], args.pp),
                     "calls_rank1": ranks[1]["calls"], "peak_saved": ranks[0]["peak_saved"]})
    # Stage 0 saves its input twice per micro-batch (InputPath's and WeightGrad's); with V 2 rank 0
    # also runs a later chunk, so only bytes are shown there.
    per_mb = MICRO_BATCH * HIDDEN * 4 * 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"P = {args.pp}, T_F = T_B = T_W = {args.ms:g} ms per rank and micro-batch, "
          f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, commit {commit}\n")
    print("| schedule | m | bubble measured | theory | step s | backward calls, rank 1 (input / weight) "
          "| first-stage saved activations (micro-batches) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["calls_rank1"]
        in_flight = f" ({r['peak_saved'] // per_mb})" if r["v"] == 1 else ""
        print(f"| {r['schedule']} | {r['m']} | {r['bubble']:.3f} | {r['theory']:.3f} | {r['wall']:.2f} "
              f"| {c['input_backward']} / {c['weight_backward']} | {r['peak_saved']} B{in_flight} |")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (label, _, _), colour in zip(SCHEDULES, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            mine = [r for r in rows if r["schedule"] == label]
            ms = [r["m"] for r in mine]
            ax.plot(ms, [r["bubble"] for r in mine], "o-", color=colour, label=f"{label} measured")
            ax.plot(ms, [r["theory"] for r in mine], "x:", color=colour)
        ax.set_xlabel("micro-batches per step (m)")
        ax.set_ylabel("bubble fraction")
        ax.set_xscale("log", base=2)
        ax.set_title(f"Pipeline bubble, P = {args.pp} (dotted: theory)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
