"""`starcoder demo`: the embedded default run behind `make train`.

Trains `tiny-sc2` for a few minutes on a corpus every machine has, the Python standard library's
own sources (written to JSONL and tokenised on first use), saves a checkpoint, exports it to
Hugging Face format, loads that with `transformers` and prints a completion and a FIM infill.
Running it again resumes the finished run, so it goes straight to the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

DEFAULT_STEPS = 300
# Tests, the IDE, and data tables (codec maps, pydoc topics) that read like anything but code.
SKIP_DIRS = {"test", "tests", "idlelib", "encodings", "pydoc_data", "site-packages", "dist-packages",
             "__pycache__"}
# Prompts end mid-statement: a model this small, trained this briefly, answers a bare line end
# with more line ends.
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return "
FIM_PREFIX = "def read_lines(path):\n    with open(path) as f:\n        lines = "
FIM_SUFFIX = "\n    return [line.rstrip() for line in lines]\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", metavar="DIR",
                        help="where the corpus, the run and the Hugging Face export go (default runs/demo)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps of 8 x 256 tokens (default {DEFAULT_STEPS}, a few minutes on 2 cores)")
    parser.add_argument("--max-files", type=int, default=None, metavar="N",
                        help="use only the first N standard-library files (quick checks)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads for training (default: all available cores)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a tiny-sc2 config key (repeatable)")


def run(args) -> int:
    import torch

    from starcoder.config import load_config
    from starcoder.convert.export import to_hf
    from starcoder.training.trainer import train

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    start = time.perf_counter()
    settings = [f"train.output_dir={out / 'run'}", f"train.max_steps={args.steps}",
                "data.num_workers=1", "log.every=10", "train.eval_every=0"] + args.overrides
    load_config("tiny-sc2", settings)  # a mistake in --set or --steps stops before the corpus is made
    prefix = prepare_corpus(out / "data", args.max_files)
    cfg = load_config("tiny-sc2", [f"data.paths=[{prefix}]"] + settings)
    train(cfg)
    hf = to_hf(out / "run", out / "hf")
    print(f"\nexported {out / 'run'} (latest checkpoint) to {hf} in Hugging Face format")
    show_samples(hf)
    print(f"\ndone in {time.perf_counter() - start:.0f}s; the run is in {out / 'run'} "
          f"(delete {out} to start over)")
    return 0


def stdlib_sources(max_files: int | None = None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP_DIRS.intersection(p.relative_to(root).parts))
    return files[:max_files]


def prepare_corpus(folder: Path, max_files: int | None = None) -> str:
    """The standard library as one JSONL document per file, tokenised to `.bin/.idx` once."""
    from starcoder.data import preprocess_corpus

    prefix = folder / "stdlib"
    if Path(f"{prefix}.idx").is_file():
        return str(prefix)
    folder.mkdir(parents=True, exist_ok=True)
    files = stdlib_sources(max_files)
    jsonl = folder / "stdlib.jsonl"
    with open(jsonl, "w") as f:
        for path in files:
            f.write(json.dumps({"content": path.read_text(errors="replace")}) + "\n")
    print(f"tokenising {len(files)} standard-library files from {files[0].parent} ...")
    report = preprocess_corpus([jsonl], "builtin:tiny", str(prefix), workers=1)
    print(f"corpus: {report.documents:,} documents, {report.tokens:,} tokens -> {prefix}.bin/.idx")
    jsonl.unlink()
    return str(prefix)


def show_samples(hf: Path) -> None:
    """A greedy completion and a fill-in-the-middle infill from the exported model, read back
    by `transformers` (model and tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))
    stop = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<file_sep>", "<fim_pad>")
            if tok.convert_tokens_to_ids(t) is not None]

    def generate(text: str, max_new_tokens: int) -> str:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=stop[0])
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    print("\n--- completion (greedy) " + "-" * 42)
    print(PROMPT + generate(PROMPT, 40).rstrip())
    fim = f"<fim_prefix>{FIM_PREFIX}<fim_suffix>{FIM_SUFFIX}<fim_middle>"
    print("--- fill-in-the-middle (the infill is between >>> and <<<) " + "-" * 6)
    print(f"{FIM_PREFIX}>>>{generate(fim, 16).rstrip()}<<<{FIM_SUFFIX}")
    print("(4.9M parameters after a few minutes on a CPU: Python-looking text, not working code; "
          "more --steps get further)")
