"""tools/stdlib_instructions.py (the README's fine-tuning data): a docstring becomes the
instruction and the function without it the response; held-out functions become prompts in the
instruct template and stay out of the pairs."""

import ast
import importlib.util
import json
from pathlib import Path

from starcoder.data.examples import SYSTEM

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("stdlib_instructions", ROOT / "tools" / "stdlib_instructions.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

SOURCE = '''
def add(a, b):
    """Return the sum of a and b."""
    return a + b

def tiny():
    """Two words."""
    return 1

def only_doc():
    """Nothing below this docstring at all."""

class A:
    def long(self):
        """A method whose body is far too long to keep."""
        return [''' + "1, " * 200 + ''']
'''


def test_docstring_is_the_instruction_and_the_rest_the_response():
    assert tool.function_pairs(SOURCE, max_chars=400) == [
        ("add", "Return the sum of a and b.", "def add(a, b):\n    return a + b")]
    assert tool.function_pairs("def broken(:\n", 400) == []


def test_held_out_prompts_are_not_in_the_pairs(tmp_path):
    pairs, prompts = tmp_path / "pairs.jsonl", tmp_path / "prompts.jsonl"
    tool.main(["--output", str(pairs), "--prompts", str(prompts), "--max-files", "20", "--holdout", "5"])
    train = [json.loads(line) for line in pairs.read_text().splitlines()]
    held = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert train and len(held) == 3
    for pair in train:  # one function (with its decorators), its docstring gone
        assert set(pair) == {"instruction", "response"}
        (node,) = ast.parse(pair["response"]).body
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node) is None
    instructions = {p["instruction"] for p in train}
    for prompt in held:
        assert prompt.startswith(SYSTEM + "\n\n### Instruction\n") and prompt.endswith("\n\n### Response\n")
        assert prompt[len(SYSTEM + "\n\n### Instruction\n"):-len("\n\n### Response\n")] not in instructions
