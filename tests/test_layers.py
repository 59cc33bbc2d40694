"""Imports run downward only: cli -> selfalign -> training / eval / curation / generation /
planning / launch -> finetune / convert -> models / parallel / data -> kernels, with nothing
importing a layer above its own (checked on the source, module by module)."""

import ast
from pathlib import Path

import starcoder

ROOT = Path(starcoder.__file__).parent
# Subpackage -> its layer; a module may import its own layer or any lower one, never a higher.
LAYER = {"cli": 6, "selfalign": 5, "training": 4, "eval": 4, "curation": 4, "generation": 4,
         "planning": 4, "launch": 4, "finetune": 3, "convert": 3, "models": 2, "parallel": 2,
         "data": 2, "kernels": 1}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_imports_run_downward_only():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        package = path.relative_to(ROOT).parts[0]
        if package not in LAYER:
            continue  # top-level modules (config, api, __init__) are below or beside everything
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "starcoder" and len(parts) > 1 and parts[1] in LAYER:
                if LAYER[parts[1]] > LAYER[package]:
                    upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward, "\n".join(upward)
