"""`starcoder generate`: completions or fill-in-the-middle infills from a model, with a KV cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from starcoder.config import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a native model folder, a training run folder (its latest checkpoint), "
                             "a checkpoint step folder or a Hugging Face folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one prompt (the prefix with --fim-suffix)")
    src.add_argument("--prompts", metavar="FILE", type=Path,
                     help="a text file of prompts, one JSON string or {\"prompt\": ...} per line")
    src.add_argument("--fim-prefix", metavar="P", help="infill between P and --fim-suffix")
    parser.add_argument("--fim-suffix", metavar="S", help="the text after the gap to fill")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default 128")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default) is greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 (default): no top-k cut")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-samples", type=int, default=1, metavar="N", help="completions per prompt")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end a completion before this text (repeatable)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", action="store_true", help="print one JSON object per completion")


def run(args) -> int:
    from starcoder.generation import Sampling, load_generator

    for key in ("max_new_tokens", "n_samples", "batch_size"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}: must be at least 1, got {getattr(args, key)}")
    if args.fim_prefix is not None and args.fim_suffix is None:
        raise UserError("--fim-prefix: needs --fim-suffix")
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt or args.fim_prefix]
    gen = load_generator(args.model, args.device)
    model_prompts = prompts
    if args.fim_suffix is not None:
        model_prompts = [gen.fim_prompt(p, args.fim_suffix) for p in prompts]
    repeated = [p for p in model_prompts for _ in range(args.n_samples)]
    completions = gen.complete(repeated, args.max_new_tokens, sampling, args.stop, args.batch_size)
    for i, c in enumerate(completions):
        if args.json:
            print(json.dumps({"prompt": i // args.n_samples, "sample": i % args.n_samples,
                              "completion": c.text, "truncated": c.truncated, "too_long": c.too_long}))
        else:
            print(f"--- prompt {i // args.n_samples} sample {i % args.n_samples} ---")
            print(prompts[i // args.n_samples] + c.text + (args.fim_suffix or ""))
    cut = sum(c.truncated for c in completions)
    too_long = sum(c.too_long for c in completions)
    if cut or too_long:
        print(f"{cut} prompt(s) cut from the left to the model's {gen.context} positions; "
              f"{too_long} left no room for new tokens (empty completions)")
    return 0


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"--prompts: {path}: no such file")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            prompts.append(value["prompt"] if isinstance(value, dict) else value)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--prompts: {path}:{n}: expected a JSON string or {{\"prompt\": ...}}") from None
        if not isinstance(prompts[-1], str):
            raise UserError(f"--prompts: {path}:{n}: the prompt is not a string")
    if not prompts:
        raise UserError(f"--prompts: {path}: no prompts")
    return prompts
