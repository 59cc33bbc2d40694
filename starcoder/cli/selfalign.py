"""`starcoder selfalign`: SelfCodeAlign, the model writing its own instruction data."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

EPILOG = """\
stages, in order (each reads the one before it, from OUTPUT/<stage>/):
  seeds      Python functions with docstrings from --seeds, filtered as SelfCodeAlign does,
             HumanEval substrings dropped, near-dedup at Jaccard 0.5 (optional model judge)
  concepts   S->C: the model lists each seed's programming concepts (few-shot prompt)
  tasks      C->I: the model writes a task for the concepts and drawn category/difficulty
  responses  I->R: 10 sampled responses per task, each with its own tests
  validate   each response's code runs with its tests in the bubblewrap sandbox
  select     one random passing response per task, exact and MinHash dedup
Output: OUTPUT/select/00000.jsonl (`instruction`, `response`: read by `starcoder preprocess
--format instruct`), OUTPUT/report.json. Rerunning the same command resumes: finished shards are
not redone.

examples:
  starcoder selfalign --model runs/demo/run --seeds stdlib --output runs/selfalign \\
      --config configs/selfalign/tiny.yaml
  starcoder selfalign --model bigcode/starcoder2-15b-hf --seeds data/functions/ --output sa \\
      --device cuda --backend vllm --executor slurm --set run.slurm_partition=gpu --set run.tasks=8
  starcoder selfalign --stages validate,select --input responses.jsonl --output checked
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from starcoder.selfalign.config import DEFAULT_CONFIG

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", metavar="PATH",
                        help="native model folder, training run, checkpoint or Hugging Face folder "
                             "(needed by concepts, tasks, responses and the seed judge)")
    parser.add_argument("--seeds", nargs="+", metavar="PATH",
                        help="Python files or folders to take seed functions from; `stdlib`: this "
                             "Python's standard library, as `make train` reads it (needed by the "
                             "seeds stage)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="run folder; an existing one is resumed")
    parser.add_argument("--config", metavar="FILE",
                        help=f"selfalign config YAML (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
    parser.add_argument("--stages", default="seeds,concepts,tasks,responses,validate,select",
                        help="comma-separated stages to run, in pipeline order (default: all)")
    parser.add_argument("--input", metavar="FILE.jsonl",
                        help="records for the first stage instead of the stage before it (for "
                             "validate: `instruction` and `response`, the raw model output)")
    parser.add_argument("--backend", default="native", choices=("native", "vllm"),
                        help="generation: our model with its KV cache, or vLLM (GPU, if installed)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or an accelerator, e.g. cuda")
    parser.add_argument("--executor", default="local", choices=("local", "slurm"),
                        help="datatrove executor, as `starcoder curate` (default: local)")
    parser.add_argument("--workers", type=int, metavar="N", help="local tasks at once (run.workers)")
    parser.add_argument("--unsafe-no-sandbox", action="store_true",
                        help="validate without bubblewrap (only rlimits and a timeout)")


def run(args) -> int:
    from starcoder.cli.demo import stdlib_sources
    from starcoder.config import UserError
    from starcoder.selfalign.config import GENERATION_STAGES, STAGES, load_selfalign_config
    from starcoder.selfalign.pipeline import Job, selfalign
    from starcoder.selfalign.report import format_table

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"run.workers={args.workers}")
    cfg = load_selfalign_config(args.config, overrides)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UserError(f"--stages {args.stages}: expected some of {','.join(STAGES)}")
    if stages != sorted(set(stages), key=STAGES.index):
        raise UserError(f"--stages {args.stages}: list each stage once, in pipeline order "
                        f"({','.join(STAGES)})")
    needs_model = [s for s in stages if s in GENERATION_STAGES or (s == "seeds" and cfg.seeds.judge)]
    if needs_model and not args.model:
        raise UserError(f"--model: needed by the {needs_model[0]} stage")
    if needs_model:
        check_model(args.model)
    if needs_model and args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        from starcoder.selfalign.vllm_backend import NOT_INSTALLED
        raise UserError(NOT_INSTALLED)
    if args.input is not None and not Path(args.input).is_file():
        raise UserError(f"--input {args.input}: no such file")
    seeds = []
    for s in args.seeds or []:  # `stdlib`: the files `make train` trains on
        seeds += [str(p) for p in stdlib_sources()] if s == "stdlib" else [s]
    if "seeds" in stages and args.input is None and not seeds:
        raise UserError("--seeds: needed by the seeds stage (Python files or folders, or `stdlib`)")
    missing = [s for s in seeds if not Path(s).exists()]
    if "seeds" in stages and args.input is None and missing:  # named here, not in a task's traceback
        raise UserError(f"--seeds {missing[0]}: no such file or folder")
    if "validate" in stages:
        from starcoder.eval.sandbox import Sandbox
        with Sandbox(unsafe_no_sandbox=args.unsafe_no_sandbox) as sandbox:
            sandbox.check()
    job = Job(str(Path(args.output).resolve()), cfg, stages,
              str(Path(args.model).resolve()) if args.model else None,
              [str(Path(s).resolve()) for s in seeds], backend=args.backend, device=args.device,
              unsafe_no_sandbox=args.unsafe_no_sandbox)
    report = selfalign(job, args.executor, args.input)
    if report is None:
        print(f"submitted; {args.output}/report.json appears when the last job ends")
        return 0
    print(format_table(report))
    if "output" in report:
        print(f"\nwrote {report['output']} (instruction, response); report: {args.output}/report.json")
    return 0


def check_model(path: str) -> None:
    """A model folder that cannot be read is named here, before any task starts (a task's error
    would come with datatrove's traceback)."""
    from starcoder.config import UserError
    from starcoder.convert.weights import folder_kind, read_folder_config, resolve_folder

    try:
        folder = resolve_folder(path)
        read_folder_config(folder, folder_kind(folder))
    except (OSError, ValueError) as err:
        raise UserError(f"--model: {err}") from None
