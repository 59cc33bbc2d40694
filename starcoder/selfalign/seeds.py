"""Seeds: module-level Python functions with docstrings, extracted with `ast`, filtered by
SelfCodeAlign's `filter_dataset.py` rules, decontaminated against HumanEval (the curation
stage's substring match) and near-deduplicated at Jaccard 0.5.

A seed is the function's source, preceded by the file's own imports that it uses (the reference
adds imports with `autoimport`, which is what makes its import rule bite)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterable, Optional

from starcoder.config import UserError
from starcoder.curation.decontaminate import Decontaminator, humaneval_needles
from starcoder.selfalign.near_dedup import near_duplicates
from starcoder.selfalign.report import StageReport

BANNED_WORDS = ("todo", "fixme", "bug")
BANNED_IMPORTS = ("argparse", "os", "subprocess", "sys", "setuptools", "distutils", "matplotlib",
                  "seaborn")
MAX_LINES = 150
# ast's line breaks; str.splitlines also breaks at form feeds and others, shifting line numbers.
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def read_sources(paths: Iterable[str | Path]) -> list[dict]:
    """`{"path", "content"}` for each .py file given or found under a folder given."""
    sources = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(path.rglob("*.py"))
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"--seeds {path}: no such file or folder")
        for f in files:
            try:
                sources.append({"path": str(f), "content": f.read_text(encoding="utf-8")})
            except (UnicodeDecodeError, OSError):
                continue  # not text: not a source of seeds
    return sources


def _bound_names(node: ast.Import | ast.ImportFrom) -> list[tuple[str, ast.alias]]:
    if isinstance(node, ast.Import):
        return [(a.asname or a.name.split(".")[0], a) for a in node.names]
    return [(a.asname or a.name, a) for a in node.names if a.name != "*"]


def extract_functions(content: str, path: str = "") -> list[dict]:
    """`{"seed", "path", "name", "lineno"}` for each module-level function. Raises SyntaxError."""
    tree = ast.parse(content)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    lines = LINE_BREAK.split(content)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        source = "\n".join(lines[start - 1:node.end_lineno])
        header = []
        # Names are looked up only for functions the docstring rule can keep (walking every
        # function's tree is most of the cost on a large corpus).
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if imports and ast.get_docstring(node) else ()
        for imp in imports if used else ():
            aliases = [a for name, a in _bound_names(imp) if name in used]
            if aliases:
                kept = (ast.Import(names=aliases) if isinstance(imp, ast.Import)
                        else ast.ImportFrom(module=imp.module, names=aliases, level=imp.level))
                header.append(ast.unparse(kept))
        seed = "\n".join(header) + "\n\n\n" + source if header else source
        out.append({"seed": seed + "\n", "path": path, "name": node.name, "lineno": start})
    return out


def rule_broken(seed: str, max_lines: int = MAX_LINES) -> Optional[str]:
    """The first `filter_dataset.py` rule the seed breaks, or None."""
    try:
        tree = ast.parse(seed)
    except SyntaxError:  # a function whose last line continues past it (a trailing backslash)
        return "does not parse alone"
    fn = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    first = fn.body[0]
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
            and ast.get_source_segment(seed, first).lstrip("rRuU").startswith('"""')):
        return 'no """ docstring'
    lowered = seed.lower()
    if any(word in lowered for word in BANNED_WORDS):
        return "todo/fixme/bug"
    for node in ast.walk(tree):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(m.split(".")[0] in BANNED_IMPORTS for m in modules):
            return "banned import"
    if len(seed.strip().splitlines()) > max_lines:
        return f"over {max_lines} lines"
    a = fn.args
    if not (a.posonlyargs or a.args or a.kwonlyargs or a.vararg or a.kwarg):
        return "no arguments"
    if not any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(fn)):
        return "no return"
    return None


def seeds(sources: list[dict], decontaminator: Optional[Decontaminator] = None,
          threshold: float = 0.5, num_perm: int = 256, ngram: int = 5, max_lines: int = MAX_LINES,
          ) -> tuple[list[dict], StageReport]:
    """`sources` hold `path` and `content` (files, or The Stack's rows). Records in are the
    functions found; files that do not parse are counted in `extra`."""
    if decontaminator is None:
        decontaminator = Decontaminator(humaneval_needles())
    report = StageReport("seeds")
    functions, unparsable = [], 0
    for source in sources:
        try:
            functions.extend(extract_functions(source["content"], source.get("path", "")))
        except (SyntaxError, ValueError):  # ValueError: null bytes
            unparsable += 1
    report.records_in = len(functions)
    kept = []
    for f in functions:
        reason = rule_broken(f["seed"], max_lines)
        if reason is None and (match := decontaminator.match(f["seed"])) is not None:
            reason, f["contamination"] = "benchmark substring", match
        if reason is None:
            kept.append(f)
        else:
            report.drop(reason)
    dup = near_duplicates(kept, lambda r: r["seed"], threshold, num_perm, ngram)
    report.drop("near-duplicate", sum(dup))
    kept = [f for f, d in zip(kept, dup) if not d]
    report.records_out = len(kept)
    report.extra.update(files=len(sources), files_unparsable=unparsable)
    report.check()
    return kept, report
