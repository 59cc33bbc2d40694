"""The `starcoder` command: one entry point, one module per subcommand (imported lazily, so
`starcoder info` does not pay for what `starcoder train` needs)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from starcoder.config import UserError

# name -> (module under starcoder.cli, one-line help)
COMMANDS = {
    "train": ("train", "train a model (one process, or under torchrun / srun)"),
    "preprocess": ("preprocess", "tokenise a corpus into Megatron .bin/.idx files"),
    "convert": ("convert", "convert between native checkpoints and Hugging Face models"),
    "curate": ("curate", "curate a code corpus: dedup, filters, PII redaction, decontamination"),
    "generate": ("generate", "complete or infill prompts with a model (KV cache, greedy or sampled)"),
    "eval": ("eval", "HumanEval pass@k and HumanEval infilling, generated code run in a sandbox"),
    "selfalign": ("selfalign", "SelfCodeAlign: the model writes instruction data, kept if its own tests pass"),
    "launch": ("launch", "check a SLURM launch, write its sbatch script into the run folder, submit it"),
    "status": ("status", "summarise a run folder: steps, last checkpoint, restarts, last log lines"),
    "plan": ("plan", "per-GPU memory and communication of a layout, and the layouts that fit"),
    "info": ("info", "print a model's architecture, parameter count and FLOPs per token"),
    "demo": ("demo", "the embedded default run: train tiny-sc2 on the Python stdlib, export, complete"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="starcoder",
        description="Pretraining stack for StarCoder / StarCoder2 code models.",
        epilog="Run `starcoder COMMAND --help` for a command's options.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also STARCODER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen command's module is imported; the others appear with their help line.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    handlers = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"starcoder.cli.{module_name}")
            module.add_arguments(p)
            handlers[name] = module.run
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return handlers[args.command](args) or 0
    except (UserError, *PATH_ERRORS) as err:
        if args.debug or os.environ.get("STARCODER_DEBUG") == "1":
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2


# A path the user named that is missing, or is the wrong kind, or is unreadable: a mistake, not a
# bug, wherever it is noticed (Python's own message names the path).
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The shared `--config FILE|PRESET` and repeated `--set section.key=value` options."""
    parser.add_argument("--config", required=required, metavar="FILE|PRESET",
                        help="YAML config file or preset name (e.g. tiny-sc2, starcoder2-15b)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable); the value is parsed as YAML")
