"""Our distributed optimizer against FSDP2 (`torch.distributed.fsdp.fully_shard`) over the
data-parallel mesh, on gloo ranks, and whether FSDP2 composes with our hand-written tensor-parallel
layers and with pipeline stages (issue 11).

Every run trains the same model from the same seed on the same global batch (8 sequences of 64
tokens, bf16 weights, fp32 gradient reduction, AdamW, clipping at 1.0), so all losses are
comparable, whatever the layout:

- `dist-opt`: `build_optimizer` with `parallel.distributed_optimizer` (the trainer's path: bf16
  weights in a `GradBuffer`, fp32 gradients reduce-scattered from backward hooks, fp32 main weights
  and Adam for this rank's 1/DP slice, bf16 all-gather after the step);
- `fsdp2`: `fully_shard` per block and on the root with `MixedPrecisionPolicy(bf16, fp32)`, plain
  AdamW on the fp32 DTensor shards, FSDP2's defaults (ZeRO-3: weights re-gathered in forward and
  backward, gradients reduce-scattered per micro-batch);
- `fsdp2-zero1`: the same, tuned towards ZeRO-1/2 for gradient accumulation: no reshard after
  forward, and for all but the last micro-batch no gradient sync and no reshard after backward
  (unsharded fp32 gradients accumulate; one reduce-scatter per step).

On gloo both reduce-scatter as `all_to_all_single` plus a local sum (FSDP2 through
`set_custom_reduce_scatter`): gloo's own `reduce_scatter_tensor` sends an all-reduce's bytes, which
would make FSDP2's step time pessimistic for a reason NCCL does not share.

Measured per rank: losses, bytes sent per step by group and collective (`CommAccounting`, ring
model, over the timed steps), persistent bytes of weights, gradients, main weights and optimizer
state, and step time (median and best of the steps after the first; on a shared 2-core machine
only the bytes and memory are stable). Then FSDP2 over TP 2 (SP, MQA, so
parameters with `tp_copies`/`partial_grad`) x DP 2 and over PP 2 x DP 2, on 4 ranks: what runs,
what breaks, and with which error.

    python benchmarks/fsdp_vs_distributed_optimizer.py [--steps 6] [--dp 2 4] [--json FILE]

Prints Markdown tables for benchmarks/RESULTS.md (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOBAL_BATCH, SEQ, MICRO_BATCHES, VOCAB_USED, LR, CLIP = 8, 64, 2, 512, 1e-3, 1.0
MODES = ("dist-opt", "fsdp2", "fsdp2-zero1")


# --------------------------------------------------------------------------------------------
# The model, the data and one step, shared by every mode


def config(preset: str, *overrides: str):
    from starcoder.config import load_config

    return load_config(preset, [f"train.seq_length={SEQ}", "parallel.distributed_optimizer=true",
                                "train.precision=bf16", *overrides])


def build(cfg, grid):
    """The trainer's model for this rank (fp32, before any optimizer takes it)."""
    from starcoder.training.trainer import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg, grid, torch.device("cpu"))


def micro_batches(step: int, dp: int, dp_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of step `step`'s global batch, in MICRO_BATCHES micro-batches (random
    tokens from the first VOCAB_USED ids: a unigram the model learns within a few steps)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB_USED, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    mine = tokens.chunk(dp)[dp_rank].chunk(MICRO_BATCHES)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in mine]


def tokens_per_rank(dp: int) -> int:
    return GLOBAL_BATCH // dp * SEQ


class AllToAllReduceScatter:
    """FSDP2's reduce-scatter as gloo should do it: all-to-all, then a local sum (what our
    `GradBuffer` does on gloo). The interface is FSDP2's `ReduceScatter`, private in torch 2.13
    (`torch.distributed.fsdp._fully_shard._fsdp_api`), so this one is duck-typed."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        n = dist.get_world_size(group)
        received = torch.empty_like(input_tensor)
        dist.all_to_all_single(received, input_tensor, group=group)
        torch.sum(received.view(n, -1), dim=0, out=output_tensor)
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(n)


def shard_fsdp2(model, mesh, zero1: bool):
    """`fully_shard` every block of `model` (a `GPT` or a `StageModule`), then `model` itself:
    bf16 weights, fp32 reduction, the all-to-all reduce-scatter on gloo. Returns the FSDP
    modules."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs would also cast the fp32 RoPE tables each block takes to bf16: other
    # numerics than the bf16 model (measured: the first loss already differs, by about 1e-5).
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    options = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=False if zero1 else None)
    sharded = [fully_shard(block, **options) for block in model.blocks.values()]
    sharded.append(fully_shard(model, **options))
    if dist.get_backend(mesh.get_group()) == "gloo":
        for m in sharded:
            m.set_custom_reduce_scatter(AllToAllReduceScatter())
    return sharded


def adamw(model, cfg):
    from starcoder.training.optimizer import param_groups

    t = cfg.train
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=LR,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


class Run:
    """One mode's model and optimizer on this rank; `step(i)` trains global step i."""

    def __init__(self, mode: str, cfg, grid, reattach: bool = False, on_shards: bool = False):
        from starcoder.training.optimizer import build_optimizer

        self.mode, self.cfg, self.grid, self.on_shards = mode, cfg, grid, on_shards
        self.accumulated = self.grad_bytes = 0  # see _accumulated_bytes, held
        self.model = build(cfg, grid)
        self.described = {n: dict(p.__dict__) for n, p in self.model.named_parameters()}
        if mode == "dist-opt":
            self.optimizer = build_optimizer(self.model, cfg, grid, torch.device("cpu"), "bf16")
            self.fsdp = []
            self.kept = self._kept()
        else:
            mesh = grid.mesh["dp"]
            self.fsdp = shard_fsdp2(self.model, mesh, mode == "fsdp2-zero1")
            self.kept = self._kept()
            if reattach:
                reattach_descriptions(self.model, self.described)
            self.optimizer = adamw(self.model, cfg)

    def step(self, i: int) -> tuple[float, float]:
        from starcoder.parallel import reduce_replicated_grads

        g, model = self.grid, self.model
        batches = micro_batches(i, g.dp, g.dp_rank)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        if self.mode == "dist-opt":
            self.optimizer.buffer.weight = 1.0 / g.dp  # equal token counts on every rank
        for k, (x, y) in enumerate(batches):
            last = k == len(batches) - 1
            if self.mode == "dist-opt":
                self.optimizer.buffer.sync = last
            elif self.mode == "fsdp2-zero1":
                for m in self.fsdp:
                    m.set_requires_gradient_sync(last, recurse=False)
                    m.set_reshard_after_backward(last, recurse=False)
            losses = model(x, y)
            (losses.sum() / tokens_per_rank(g.dp)).backward()
            loss_sum += losses.detach().sum()
            self.accumulated = max(self.accumulated, self._accumulated_bytes())
        dist.all_reduce(loss_sum, group=g.group("dp"))
        if self.mode == "dist-opt":
            self.optimizer.buffer.finish_grad_sync()
        if g.tp > 1:
            (replicated_sum_on_shards if self.on_shards else reduce_replicated_grads)(model, g)
        if self.mode == "dist-opt":
            norm = self.optimizer.grad_norm()
            self.optimizer.scale_grads((CLIP / (norm + 1e-6)).clamp(max=1.0))
        elif self.on_shards:
            norm = clip_on_shards(model, g)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.grad_bytes = nbytes(p.grad for p in model.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.item() / (GLOBAL_BATCH * SEQ), float(norm)

    def _kept(self) -> int:
        """Parameters that still carry every attribute of their shard description."""
        return sum(1 for n, p in self.model.named_parameters()
                   if self.described[n] and all(hasattr(p, k) for k in self.described[n]))

    def _accumulated_bytes(self) -> int:
        """Unsharded fp32 gradients FSDP2 holds between micro-batches without gradient sync."""
        return nbytes(fp.unsharded_accumulated_grad for m in self.fsdp
                      for group in m._get_fsdp_state()._fsdp_param_groups for fp in group.fsdp_params)

    def held(self) -> dict[str, int]:
        """Bytes this rank holds at the optimizer step: weights, gradients, fp32 main weights, Adam.
        FSDP2's weights are its fp32 shards (main weights); its gathered bf16 weights
        (`gathered_bytes`) and, without gradient sync, its unsharded fp32 gradients
        (`accumulated`) come on top during forward and backward."""
        if self.mode == "dist-opt":
            return self.optimizer.memory_bytes()
        state = [v for s in self.optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.ndim > 0]
        params = list(self.model.parameters())
        return {"weights": 0, "grads": self.grad_bytes, "main_weights": nbytes(params),
                "adam": nbytes(state)}

    def gathered_bytes(self) -> tuple[int, int]:
        """(largest FSDP group, whole model) in bf16: what a ZeRO-3 forward holds gathered at a
        time (about two groups with prefetching) and what `fsdp2-zero1` keeps gathered."""
        groups = [sum(p.numel() for p in m.parameters() if not _in_child(m, p)) for m in self.fsdp]
        return (2 * max(groups), 2 * sum(groups)) if groups else (0, 0)


def reattach_descriptions(model, described: dict) -> None:
    """Give FSDP2's DTensor parameters back the descriptions (`tp_copies`, `partial_grad`,
    `full_shape`, `shard_slices`, `pipeline_copy`) that `fully_shard` dropped."""
    for name, p in model.named_parameters():
        p.__dict__.update(described[name])


def replicated_sum_on_shards(model, grid) -> None:
    """`reduce_replicated_grads` on FSDP2's local gradient shards: the TP copies of a tensor sit
    on the same data-parallel rank, so their local shards are the same elements."""
    from starcoder.parallel import copy_group

    for p in model.parameters():
        if getattr(p, "partial_grad", False) and p.grad is not None:
            dist.all_reduce(local(p.grad), group=copy_group(p, grid))


def clip_on_shards(model, grid) -> torch.Tensor:
    """The global norm from FSDP2's local gradient shards (each TP copy once, a tied embedding's
    pipeline copy not at all; shards, TP ranks and stages summed over the world), and clipping.
    torch's `clip_grad_norm_` over the DTensors reduces over the DP mesh only."""
    from starcoder.parallel.grads import tp_copies

    grads = [local(p.grad) for p in model.parameters() if p.grad is not None
             and grid.tp_rank % tp_copies(p) == 0 and not getattr(p, "pipeline_copy", False)]
    total = torch.stack([x.float().pow(2).sum() for x in grads]).sum()
    dist.all_reduce(total)
    norm = total.sqrt()
    torch._foreach_mul_([local(p.grad) for p in model.parameters() if p.grad is not None],
                        (CLIP / (norm + 1e-6)).clamp(max=1.0))
    return norm


def _in_child(module, param) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(c, FSDPModule) and any(q is param for q in c.parameters())
               for c in module.modules() if c is not module)


# --------------------------------------------------------------------------------------------
# Part 1: data parallel only


def compare_dp(steps: int) -> dict:
    from starcoder.parallel import init_grid
    from starcoder.parallel.comm_accounting import CommAccounting

    out = {}
    for mode in MODES:
        cfg = config("tiny-sc2")
        grid = init_grid(cfg.parallel, "cpu")
        run = Run(mode, cfg, grid)
        psi = sum(p.numel() for p in run.model.parameters())
        losses, norms, times = [], [], []
        accounting = CommAccounting({"dp": grid.group("dp")})
        for i in range(1, steps + 1):
            dist.barrier()
            start = time.perf_counter()
            if i > 1:
                accounting.__enter__()
            loss, norm = run.step(i)
            if i > 1:
                accounting.__exit__(None, None, None)
            times.append(time.perf_counter() - start)
            losses.append(loss)
            norms.append(norm)
        sent = {f"{g} {k}": v / (steps - 1) for (g, k), v in accounting.sent().items()}
        calls = {}
        for c in accounting.calls:
            key = f"{c.group} {c.kind} {str(c.dtype).replace('torch.', '')}"
            calls[key] = calls.get(key, 0) + 1 / (steps - 1)
        out[mode] = {"losses": losses, "norms": norms, "step_s": statistics.median(times[1:]),
                     "best_s": min(times[1:]),
                     "sent": sent, "calls": calls, "held": run.held(), "psi": psi,
                     "gathered": run.gathered_bytes(), "accumulated": run.accumulated}
        del run
    return out


# --------------------------------------------------------------------------------------------
# Part 2: composition with tensor and pipeline parallelism (4 ranks)


def _attempt(fn):
    try:
        return {"ok": True, **fn()}
    except Exception as err:  # record what broke, exactly
        tb = traceback.extract_tb(err.__traceback__)
        where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb)), "")
        return {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:240]}",
                "where": where}


def _copies_spread(run) -> float:
    """Largest difference between the TP ranks' copies of every replicated tensor (LayerNorms,
    positions, row-parallel biases, the MQA KV head), taken on this rank's local shards."""
    g, worst = run.grid, 0.0
    for name, p in run.model.named_parameters():
        if run.described[name].get("tp_copies", 1) == 1:
            continue
        mine = local(p.detach()).float().contiguous()
        peers = [torch.empty_like(mine) for _ in range(g.tp)]
        dist.all_gather(peers, mine, group=g.group("tp"))
        worst = max(worst, max(float((q - mine).abs().max()) for q in peers))
    return worst


def compose_tp(steps: int) -> dict:
    from starcoder.parallel import init_grid, to_dtensor

    sets = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]
    out = {}
    variants = (("dist-opt", "dist-opt", False, False),
                ("fsdp2 as is (torch's clip_grad_norm_)", "fsdp2", False, False),
                ("fsdp2, descriptions re-attached, our reduce_replicated_grads", "fsdp2", True, False),
                ("fsdp2, descriptions re-attached, sums and norm on local shards", "fsdp2", True, True))
    for label, mode, reattach, on_shards in variants:
        def attempt():
            cfg = config("tiny-sc1", *sets)
            run = Run(mode, cfg, init_grid(cfg.parallel, "cpu"), reattach, on_shards)
            described = sum(1 for d in run.described.values() if d)
            losses = [run.step(i)[0] for i in range(1, steps + 1)]
            result = {"losses": losses, "spread": _copies_spread(run),
                      "described": described, "kept": run.kept}
            # What a checkpoint would record for this rank's part of a column-parallel weight.
            p = run.model.blocks["0"].attn.q_proj.weight
            d = run.described["blocks.0.attn.q_proj.weight"]
            tp_shard = [len(range(*sl.indices(n))) for sl, n in zip(d["shard_slices"], d["full_shape"])]
            result["checkpoint"] = _attempt(lambda: {
                "placements": str(to_dtensor(local(p.detach()), p, run.grid).placements),
                "local": list(local(p).shape), "tp_shard": tp_shard})
            return result
        out[label] = _attempt(attempt)
    return out


def compose_pp(steps: int) -> dict:
    """FSDP2 inside pipeline stages: our `Pipeline` (PP 2, 1F1B, tied embeddings), each block and
    each `StageModule` then fully_shard-ed over DP (`PipelineStage` drives FSDP2 modules itself).
    The tied embedding's two copies are summed as the trainer does (`reduce_tied_grads`), or on
    the local shards; the norm as torch computes it on DTensors cannot see the other stage, so
    it is taken on the local shards."""
    from starcoder.parallel import Pipeline, init_grid

    def attempt(on_shards: bool):
        cfg = config("tiny-sc2", "parallel.pipeline_parallel=2")
        grid = init_grid(cfg.parallel, "cpu")
        model = build(cfg, grid)
        pipeline = Pipeline(model, cfg.parallel, grid, MICRO_BATCHES, torch.device("cpu"))
        described = {n: dict(p.__dict__) for n, p in model.named_parameters()}  # pipeline_order
        for stage_module in pipeline.modules:
            shard_fsdp2(stage_module, grid.mesh["dp"], zero1=False)
        kept = sum(1 for n, p in model.named_parameters()
                   if described[n] and all(hasattr(p, k) for k in described[n]))
        reattach_descriptions(model, described)
        optimizer = adamw(model, cfg)
        losses = []
        for i in range(1, steps + 1):
            batches = micro_batches(i, grid.dp, grid.dp_rank)
            inputs = torch.cat([x for x, _ in batches])
            labels = torch.cat([y for _, y in batches])
            total = pipeline.step(inputs, labels, 1.0 / tokens_per_rank(grid.dp))
            if on_shards:
                weight = model.embedding.word.weight
                if pipeline.embedding_group is not None:
                    dist.all_reduce(local(weight.grad), group=pipeline.embedding_group)
            else:
                pipeline.reduce_tied_grads()
            dist.all_reduce(total)  # over pp (only the last stage holds it) and dp
            clip_on_shards(model, grid)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total.item() / (GLOBAL_BATCH * SEQ))
        return {"losses": losses, "kept": kept, "described": sum(1 for d in described.values() if d)}

    return {"fsdp2 in PipelineStage, our reduce_tied_grads": _attempt(lambda: attempt(False)),
            "fsdp2 in PipelineStage, tied sum and norm on local shards": _attempt(lambda: attempt(True))}


def compose_reference(steps: int) -> dict:
    """Our distributed optimizer at DP 4 on the same global batch: the reference the pipeline
    run's losses are compared against (tiny-sc2)."""
    from starcoder.parallel import init_grid

    cfg = config("tiny-sc2")
    run = Run("dist-opt", cfg, init_grid(cfg.parallel, "cpu"))
    return {"losses": [run.step(i)[0] for i in range(1, steps + 1)]}


# --------------------------------------------------------------------------------------------
# Processes and report


def _worker(rank: int, world: int, init: str, out: str, steps: int, parts: list[str]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    import warnings

    warnings.filterwarnings("ignore")
    results = {}
    for part in parts:
        results[part] = {"dp": compare_dp, "tp": compose_tp, "pp": compose_pp,
                         "ref": compose_reference}[part](steps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()
    time.sleep(0.2)  # gloo's exit-time crash (../shared/reference/torch-distributed-cpu.md)


def spawn(world: int, steps: int, parts: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out, steps, parts), nprocs=world)
        with open(out) as f:
            return json.load(f)


def rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def report(results: dict) -> None:
    print("| DP | mode | losses (step 1 .. last) | max rel. loss diff vs dist-opt | "
          "bytes sent/rank/step by collective (ring model) | total | calls/step | "
          "held B/param (weights + grads + main + Adam) | transient (bf16 gathered: largest group / all) | step s (median / best) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dp, res in results["dp"].items():
        ref = res["dist-opt"]["losses"]
        for mode, r in res.items():
            sent = ", ".join(f"{k.split(' ', 1)[1]} {v:,.0f}" for k, v in sorted(r["sent"].items())
                             if v >= 1000)
            calls = ", ".join(f"{k.split(' ', 1)[1]} {v:g}" for k, v in sorted(r["calls"].items()))
            held = r["held"]
            parts = " + ".join(f"{held[k] / r['psi']:.2f}" for k in ("weights", "grads", "main_weights", "adam"))
            gathered = "-" if not r["gathered"][0] else \
                f"{r['gathered'][0] / 2**20:.1f} / {r['gathered'][1] / 2**20:.1f} MiB"
            if r["accumulated"]:
                gathered += f"; unsharded fp32 grads {r['accumulated'] / 2**20:.1f} MiB"
            print(f"| {dp} | {mode} | {r['losses'][0]:.4f} .. {r['losses'][-1]:.4f} | "
                  f"{rel(r['losses'], ref):.1e} | {sent} | {sum(r['sent'].values()):,.0f} | {calls} | "
                  f"{parts} = {sum(held.values()) / r['psi']:.2f} | {gathered} | "
                  f"{r['step_s']:.2f} / {r['best_s']:.2f} |")
    if "tp" in results:
        print("\n| layout | run | result | losses | vs dist-opt | TP copies spread | "
              "descriptions kept | checkpoint (`to_dtensor`) |")
        print("|---|---|---|---|---|---|---|---|")
        ref = results["tp"]["dist-opt"].get("losses")
        for label, r in results["tp"].items():
            _compose_row("TP 2 SP x DP 2 (tiny-sc1)", label, r, ref)
        for label, r in results["pp"].items():
            _compose_row("PP 2 x DP 2 (tiny-sc2)", label, r, results["ref"]["losses"])


def _compose_row(layout, label, r, ref) -> None:
    if not r["ok"]:
        print(f"| {layout} | {label} | fails at {r['where']}: `{r['error']}` | | | | | |")
        return
    losses = " ".join(f"{x:.4f}" for x in r["losses"])
    ck = r.get("checkpoint")
    if ck is None:
        ck = "-"
    elif not ck["ok"]:
        ck = f"`{ck['error']}`"
    else:
        ok = ck["local"] == ck["tp_shard"]
        ck = (f"{ck['placements'].replace('(dim=0)', '(0)')}; local {ck['local']} "
              f"{'=' if ok else 'is not'} the TP shard {ck['tp_shard']}{'' if ok else ': wrong'}")
    spread = f"{r['spread']:.1e}" if "spread" in r else "-"
    kept = f"{r['kept']} / {r['described']}" if "kept" in r else "-"
    print(f"| {layout} | {label} | runs | {losses} | {rel(r['losses'], ref):.1e} | {spread} | "
          f"{kept} | {ck} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="steps per run (the first is not timed)")
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4], help="data-parallel sizes")
    parser.add_argument("--no-compose", action="store_true", help="skip the TP / PP composition")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {"dp": {}}
    for dp in args.dp:
        parts = ["dp"] + (["tp", "pp", "ref"] if dp == 4 and not args.no_compose else [])
        res = spawn(dp, args.steps, parts)
        results["dp"][dp] = res["dp"]
        results.update({k: v for k, v in res.items() if k != "dp"})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, commit {commit}; "
          f"tiny-sc2 (tiny-sc1 for TP), global batch {GLOBAL_BATCH} x {SEQ}, {MICRO_BATCHES} "
          f"micro-batches per rank, bf16 weights, fp32 reduction; {time.perf_counter() - start:.0f} s\n")
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
