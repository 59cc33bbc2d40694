"""`starcoder plan`: per-GPU memory of a layout and whether it fits; with `--nodes` and no layout
given, the layouts that fit ranked by a roofline step time (docs/plan.md)."""

from __future__ import annotations

import json
import re

from starcoder.cli import add_config_arguments
from starcoder.config import ConfigError, load_config
from starcoder.planning import plan_layout, rank_layouts

# GPU vendors' "80 GB" is 80 GiB (an A100 80GB has 80 GiB), so GB and GiB both mean 2**30 here.
UNITS = {"": 1, "B": 1, **{p + s: 2 ** (10 * (i + 1)) for i, p in enumerate("KMGT")
                           for s in ("", "B", "IB")}}
LAYOUT_KEYS = ("parallel.tensor_parallel", "parallel.pipeline_parallel")


def parse_memory(text: str) -> int:
    """`80GB`, `80GiB`, `141 GB` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise ConfigError(f"--gpu-memory: expected a size like 80GB, got {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--nodes", type=int, help="nodes of the job: sets data parallel; without a "
                        "layout in --set, rank every TP x PP split of them")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU (default 80GB)")
    parser.add_argument("--top", type=int, default=10, help="ranked layouts to print (default 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    memory = parse_memory(args.gpu_memory)
    if args.nodes is not None and args.nodes < 1:
        raise ConfigError(f"--nodes: must be at least 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node: must be at least 1, got {args.gpus_per_node}")
    layout_given = any(o.split("=")[0].strip() in LAYOUT_KEYS for o in args.overrides)
    if args.nodes is not None and not layout_given:
        plans = rank_layouts(cfg, args.nodes, args.gpus_per_node, memory)
        fitting = [p for p in plans if p.fits]
        if args.json:
            print(json.dumps({"fits": bool(fitting), "layouts": [p.to_json() for p in plans]}, indent=1))
        else:
            print_ranking(plans[: args.top], args.nodes * args.gpus_per_node)
        return 0
    plan = plan_layout(cfg, args.nodes, args.gpus_per_node, memory)
    print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan))
    return 0


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def format_plan(plan) -> str:
    lay = plan.layout
    lines = [f"layout: TP {lay['tensor_parallel']} x PP {lay['pipeline_parallel']} x DP "
             f"{lay['data_parallel']}, sequence parallel {'on' if lay['sequence_parallel'] else 'off'}, "
             f"micro-batch {lay['micro_batch_size']} x {lay['seq_length']} tokens",
             f"busiest GPU: pipeline stage {lay['stage']} ({lay['layers_on_stage']} blocks)"]
    width = max(map(len, plan.terms))
    lines += [f"  {k:<{width}}  {gib(v):>12}" for k, v in plan.terms.items()]
    lines.append(f"  {'total':<{width}}  {gib(plan.total):>12}  of {gib(plan.gpu_memory)}: "
                 + ("fits" if plan.fits else f"does NOT fit (dominant: {plan.dominant})"))
    lines.append("communication per step per rank: "
                 + ", ".join(f"{g} {gib(b)}" for g, b in plan.comm.items()))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def print_ranking(plans, world: int) -> None:
    print(f"layouts of {world} GPUs, fitting ones fastest first (roofline model: docs/plan.md)")
    print(f"{'TP':>3} {'PP':>3} {'DP':>5}  {'memory':>12}  {'fits':>4}  {'step s':>8}  dominant")
    for p in plans:
        lay = p.layout
        print(f"{lay['tensor_parallel']:>3} {lay['pipeline_parallel']:>3} {lay['data_parallel']:>5}  "
              f"{gib(p.total):>12}  {'yes' if p.fits else 'no':>4}  {p.step_time_s:>8.3f}  {p.dominant}")
