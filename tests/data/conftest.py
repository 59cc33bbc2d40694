"""Shared fixtures of the data-path tests: tokenizers, real code, small corpora."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest

from starcoder.data.tokenizer import load_tokenizer


def shared_dir() -> Path:
    """../shared beside the repository, $STARCODER_SHARED, or /work/shared."""
    candidates = [os.environ.get("STARCODER_SHARED"),
                  Path(__file__).resolve().parents[2] / ".." / "shared", "/work/shared"]
    for c in candidates:
        if c and (Path(c) / "tokenizers").is_dir():
            return Path(c)
    return Path(candidates[1])


def real_tokenizer_path(name: str) -> Path:
    path = shared_dir() / "tokenizers" / name / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"real {name} tokenizer not found at {path} (set STARCODER_SHARED to the folder "
                    "holding tokenizers/); the product never needs it")
    return path


@pytest.fixture(scope="session")
def tiny():
    return load_tokenizer("builtin:tiny")


@pytest.fixture(scope="session")
def sc2_path():
    return real_tokenizer_path("starcoder2")


@pytest.fixture(scope="session")
def sc2(sc2_path):
    return load_tokenizer(sc2_path)


@pytest.fixture(scope="session")
def sc1():
    return load_tokenizer(real_tokenizer_path("starcoder"))


def stdlib_sources(count: int, max_bytes: int = 60_000) -> list[str]:
    """Real code: the first `count` stdlib modules (sorted by path) below max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.glob("*.py")):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) <= max_bytes:
            out.append(text)
        if len(out) == count:
            break
    return out


@pytest.fixture(scope="session")
def code():
    return stdlib_sources(40)


# Text that exercises the tokenizer's edges: Unicode, CRLF, tabs, digits, quotes, contractions.
TRICKY = [
    "d['size'] = x['key'] + y[\"it's\"]  # don't won't I'll we've they're\n",
    "def f(a, b):\r\n\treturn a  \r\n\r\n    \n        \n",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600\U0001F680 \u00bd\u00b2 x\u00b2 \u0663\u0664 \u2028 \u00a0nbsp\n",
    "x = 1234567890 + 3.14159e-10 - 0xDEADBEEF\n\n\n    \n",
    "    if (a<b && c>d) { return '\\n'; }   \n\t\t  \t\n",
    "<|endoftext|> is not the end, <fim_prefix> neither\n",
]


def write_jsonl(path: Path, rows: list, raw_lines: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
        for line in raw_lines:
            f.write(line.rstrip(b"\n") + b"\n")
    return path


def small_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A byte-level BPE like the tiny one with a much smaller vocabulary (and so different ids):
    what another tokenizer's data looks like to a run."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[
        "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>",
        "<file_sep>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(stdlib_sources(10), trainer=trainer)
    tok.save(str(path))
    return path
