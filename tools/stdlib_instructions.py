"""Instruction/response pairs from the Python standard library's own functions: the docstring is
the instruction, the function without it is the response. A corpus every machine has, for the
README's fine-tuning example (`make finetune`).

    python tools/stdlib_instructions.py --output runs/demo/data/instructions.jsonl

writes one `{"instruction", "response"}` JSON object per function (the input of `starcoder
preprocess --format instruct`), and with `--prompts FILE` the held-out functions' instructions
laid out in the instruct template up to `### Response\\n` (the input of `starcoder generate
--prompts`). Held-out functions are every `--holdout`-th one, by a hash of the docstring, so a
docstring the library repeats (several `throw` methods say "Raise GeneratorExit inside
coroutine.") is held out everywhere and stays out of the training pairs.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starcoder.cli.demo import stdlib_sources  # noqa: E402
from starcoder.data.examples import INSTRUCT_TEMPLATE, split_template  # noqa: E402


def function_pairs(source: str, max_chars: int) -> list[tuple[str, str, str]]:
    """(name, instruction, response) for each function or method with a docstring whose code,
    re-printed without the docstring, is at most `max_chars` long."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # the standard library has a few deliberately broken files
        return []
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2 or len(doc.split()) < 4:
            continue  # a function that is only a docstring, or a docstring of two words
        node.body = node.body[1:]
        response = ast.unparse(node)
        if len(response) <= max_chars:
            pairs.append((node.name, doc.strip(), response))
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="the pairs, JSONL")
    parser.add_argument("--prompts", help="also write the held-out prompts here (JSONL of strings)")
    parser.add_argument("--max-files", type=int, default=None, help="only the first N standard-library files")
    parser.add_argument("--max-chars", type=int, default=400,
                        help="longest function kept, in characters (default 400: fits a 256-token row)")
    parser.add_argument("--holdout", type=int, default=50, help="every N-th function is held out (default 50)")
    parser.add_argument("--max-prompts", type=int, default=3, help="held-out prompts written (default 3)")
    parser.add_argument("--max-prompt-chars", type=int, default=200,
                        help="longest held-out instruction used as a prompt, in characters (default 200)")
    args = parser.parse_args(argv)

    pairs, held_out = [], []
    for path in stdlib_sources(args.max_files):
        for _, instruction, response in function_pairs(path.read_text(errors="replace"), args.max_chars):
            key = hashlib.sha1(instruction.encode()).digest()
            (held_out if int.from_bytes(key[:4], "little") % args.holdout == 0 else pairs).append(
                {"instruction": instruction, "response": response})
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    print(f"{len(pairs):,} instruction/response pairs -> {args.output} ({len(held_out)} held out)")
    if args.prompts:
        before, after = split_template(INSTRUCT_TEMPLATE)  # what preprocess puts before the response
        with open(args.prompts, "w") as f:
            # short instructions only: the prompt must leave the tiny model's 256 positions room
            prompts = [before + p["instruction"] + after for p in held_out
                       if len(p["instruction"]) <= args.max_prompt_chars][:args.max_prompts]
            f.writelines(json.dumps(prompt) + "\n" for prompt in prompts)
        print(f"{len(prompts)} held-out prompts -> {args.prompts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
