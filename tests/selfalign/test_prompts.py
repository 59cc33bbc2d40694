"""The few-shot prompt files of `starcoder selfalign` (configs/selfalign/prompts): each is a
system text then examples in exactly the format the stage's query continues, ending in a blank
line; the I->R example passes its own tests; the prompts fit their models' contexts."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from starcoder.data.tokenizer import load_tokenizer
from starcoder.selfalign.parse import Parsed, parse_response, program
from tests.data.conftest import real_tokenizer_path

PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "selfalign" / "prompts"
# One example per stage, as the stage's query spells it followed by the model's answer. No line
# of an example may start a section ("### "): generation stops there.
BODY = r"(?:(?!^### ).)+?"
END = r"\n\n(?=### |\Z)"  # an example ends in a blank line before the next one or the file's end
EXAMPLE = {
    "concepts": rf"### Snippet\n(?P<snippet>{BODY})\n\n### Concepts\n(?P<concepts>[^\n]+){END}",
    "tasks": (r"### Properties\ncategory: (?:function|class|program) implementation\n"
              r"language: python\ndifficulty: (?:easy|medium|hard)\nconcepts: [^\n]+\n\n"
              rf"### Task\n(?P<task>{BODY}){END}"),
    "responses": (rf"### Instruction\n(?P<instruction>{BODY})\n\n### Response\n(?P<response>{BODY})"
                  rf"\n\n### Tests\n(?P<tests>{BODY}){END}"),
    "judge": rf"### Snippet\n(?P<snippet>{BODY})\n\n### Answer\n(?P<answer>yes|no){END}",
}
# The queries the stage code appends, with a placeholder where the seed or instruction goes.
QUERY = {
    "concepts": "### Snippet\n{}\n\n### Concepts\n",
    "tasks": ("### Properties\ncategory: function implementation\nlanguage: python\n"
              "difficulty: easy\nconcepts: {}\n\n### Task\n"),
    "responses": "### Instruction\n{}\n\n### Response\n",
    "judge": "### Snippet\n{}\n\n### Answer\n",
}
FULL_COUNTS = {"concepts": 8, "tasks": 8, "responses": 1}
TINY_PREFIX_TOKENS = 60  # builtin:tiny tokens of a tiny prefix
TINY_CONTEXT, TINY_NEW_TOKENS, TINY_SEED_ROOM = 256, 64, 100
SC2_CONTEXT, SC2_NEW_TOKENS = 16384, 1024


def examples(path: Path) -> tuple[str, list[re.Match]]:
    """(system text, examples) of a prompt file; fails unless the part after the system text is
    nothing but examples in the stage's format."""
    text = path.read_text()
    start = text.find("### ")
    system, rest = text[:start], text[start:]
    assert "\n### " not in "\n" + system, f"{path}: a section header in the system text"
    assert system == "" or system.endswith("\n\n"), f"{path}: no blank line after the system text"
    pattern = re.compile(EXAMPLE[path.stem], re.S | re.M)
    found, end = [], 0
    while end < len(rest):
        match = pattern.match(rest, end)
        assert match, f"{path}: text at offset {start + end} is not an example: {rest[end:end + 80]!r}"
        found.append(match)
        end = match.end()
    return system, found


def prompt_files(folder: Path) -> list[Path]:
    return [folder / f"{stage}.txt" for stage in EXAMPLE]


@pytest.mark.parametrize("folder", [PROMPTS, PROMPTS / "tiny"], ids=["full", "tiny"])
def test_prompt_files_are_examples_in_the_query_format(folder):
    for path in prompt_files(folder):
        assert path.is_file(), f"missing {path}"
        text = path.read_text()
        assert text.endswith("\n\n") and not text.endswith("\n\n\n"), f"{path}: must end in one blank line"
        system, found = examples(path)
        if folder == PROMPTS:
            assert system.strip(), f"{path}: no system text"
            if path.stem in FULL_COUNTS:
                assert len(found) == FULL_COUNTS[path.stem], f"{path}: {len(found)} examples"
        else:
            assert len(found) == 1, f"{path}: a tiny prompt has one example, not {len(found)}"
    _, judged = examples(folder / "judge.txt")
    answers = {m["answer"] for m in judged}
    assert folder != PROMPTS or answers == {"yes", "no"}, "the full judge prompt needs yes and no examples"


@pytest.mark.parametrize("folder", [PROMPTS, PROMPTS / "tiny"], ids=["full", "tiny"])
def test_snippets_are_python_functions_with_docstrings(folder):
    for path in (folder / "concepts.txt", folder / "judge.txt"):
        for match in examples(path)[1]:
            functions = [node for node in ast.parse(match["snippet"]).body
                         if isinstance(node, ast.FunctionDef)]
            assert len(functions) == 1 and ast.get_docstring(functions[0]), match["snippet"]


def _parsed(path: Path) -> Parsed:
    match = examples(path)[1][0]
    # What the model writes after the query's "### Response\n", up to the next instruction.
    parsed = parse_response(match.string[match.start("response"):match.end()])
    assert parsed.error is None, f"{path}: {parsed.error}"
    return parsed


def _run(source: str, tmp_path: Path) -> int:
    script = tmp_path / "program.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          timeout=30).returncode


@pytest.mark.parametrize("folder", [PROMPTS, PROMPTS / "tiny"], ids=["full", "tiny"])
def test_response_example_passes_its_own_tests(folder, tmp_path):
    parsed = _parsed(folder / "responses.txt")
    assert _run(program(parsed), tmp_path) == 0
    # The tests exercise the solution: without it they fail.
    assert _run(program(Parsed(parsed.response, "", parsed.tests)), tmp_path) != 0


def _prompt_tokens(tokenizer, folder: Path) -> dict[str, tuple[int, int]]:
    """stage -> (prefix tokens, prefix + empty query tokens)."""
    counts = {}
    for path in prompt_files(folder):
        prefix = path.read_text()
        counts[path.stem] = (len(tokenizer.encode(prefix)),
                             len(tokenizer.encode(prefix + QUERY[path.stem].format(""))))
    return counts


def test_tiny_prompts_fit_the_tiny_context():
    counts = _prompt_tokens(load_tokenizer("builtin:tiny"), PROMPTS / "tiny")
    print("builtin:tiny tokens (prefix, prefix + query):", counts)
    for stage, (prefix, with_query) in counts.items():
        assert prefix <= TINY_PREFIX_TOKENS, f"tiny/{stage}.txt: {prefix} tokens"
        assert with_query + TINY_SEED_ROOM + TINY_NEW_TOKENS <= TINY_CONTEXT, f"tiny/{stage}.txt"


def test_full_prompts_fit_starcoder2_context():
    tokenizer = load_tokenizer(real_tokenizer_path("starcoder2"))
    counts = _prompt_tokens(tokenizer, PROMPTS)
    print("StarCoder2 tokens (prefix, prefix + query):", counts)
    for stage, (_, with_query) in counts.items():
        assert with_query + SC2_NEW_TOKENS <= SC2_CONTEXT, f"{stage}.txt: {with_query} tokens"
