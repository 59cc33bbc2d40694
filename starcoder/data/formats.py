"""Document formats for `starcoder preprocess` (spec §6.1-6.2).

A formatted document is a tuple of parts: `str` (text, tokenised) or `int` (a special token id,
inserted as is). Keeping the format's own markers as ids means escaping literal special-token
strings in source text never touches them; the tokens equal encoding the joined text.

Every random draw comes from a generator seeded by the document alone (the record's position for
`sc1-meta`, the repository name for `sc2-repo`), so the output never depends on `--workers`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Optional

from starcoder.config import UserError
from starcoder.data.tokenizer import Tokenizer

FORMATS = ("plain", "sc1-meta", "sc2-repo")
Document = tuple  # of str | int


@dataclass
class FormatOptions:
    fmt: str = "plain"
    json_key: str = "content"
    # sc1-meta keys (The Stack v1) and sc2-repo keys (The Stack v2); None -> the format's default.
    repo_key: Optional[str] = None
    path_key: Optional[str] = None
    stars_key: Optional[str] = None
    meta_prob: Optional[float] = None  # None -> 0.2 per field (sc1-meta), 0.5 (sc2-repo)
    seed: int = 1234

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise UserError(f"format {self.fmt!r}: expected one of {', '.join(FORMATS)}")
        sc1 = self.fmt == "sc1-meta"
        self.repo_key = self.repo_key or ("max_stars_repo_name" if sc1 else "repo_name")
        self.path_key = self.path_key or ("max_stars_repo_path" if sc1 else "path")
        self.stars_key = self.stars_key or "max_stars_count"
        if self.meta_prob is None:
            self.meta_prob = 0.2 if sc1 else 0.5
        if not 0.0 <= self.meta_prob <= 1.0:
            raise UserError(f"metadata probability must be in [0, 1], got {self.meta_prob}")

    def columns(self) -> list[str]:
        """The fields a record needs (what Parquet reads)."""
        if self.fmt == "plain":
            return [self.json_key]
        if self.fmt == "sc1-meta":
            return [self.json_key, self.repo_key, self.path_key, self.stars_key]
        return [self.json_key, self.repo_key, self.path_key]


def doc_rng(seed: int, key: int) -> random.Random:
    """A generator for one document; `key` is a non-negative integer naming it."""
    return random.Random((seed & (2**64 - 1)) << 64 | key)


def name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def stars_bucket(stars) -> str:
    """StarCoder's `<gh_stars>` buckets (bigcode-dataset add_content_with_meta.py)."""
    if stars is None or stars == 0:
        return "0"
    stars = int(stars)
    if stars <= 10:
        return "1-10"
    if stars <= 100:
        return "10-100"
    if stars <= 1000:
        return "100-1000"
    return "1000+"


class Formatter:
    def __init__(self, opts: FormatOptions, tokenizer: Tokenizer):
        self.opts = opts
        need = {"sc1-meta": ("<reponame>", "<filename>", "<gh_stars>"),
                "sc2-repo": ("<repo_name>", "<file_sep>")}.get(opts.fmt, ())
        self.ids = {t: tokenizer.require(t, why=f"format {opts.fmt} uses it") for t in need}

    def sc1_meta(self, content: str, obj: dict, index: int) -> Document:
        """`<reponame>R<filename>F<gh_stars>S\\n` + content, each field with probability p, in that
        order; the newline only when some metadata was added."""
        rng = doc_rng(self.opts.seed, index)
        p = self.opts.meta_prob
        draws = [rng.random() < p for _ in range(3)]  # repo, file, stars: always three draws
        parts: list = []
        values = (obj.get(self.opts.repo_key), obj.get(self.opts.path_key), obj.get(self.opts.stars_key))
        for drawn, token, value, kind in zip(draws, ("<reponame>", "<filename>", "<gh_stars>"), values,
                                             ("repo", "path", "stars")):
            if not drawn or (value is None and kind != "stars"):
                continue
            parts += [self.ids[token], stars_bucket(value) if kind == "stars" else str(value)]
        if parts:
            parts[-1] += "\n"
        parts.append(content)
        return _merge(parts)

    def sc2_repo(self, repo: str, files: list[tuple[str, str]]) -> Document:
        """One repository: with probability p `<repo_name>R<file_sep>path\\ncode<file_sep>...`,
        otherwise `<file_sep>code<file_sep>code...`; files in a random order."""
        rng = doc_rng(self.opts.seed, name_key(repo))
        with_meta = rng.random() < self.opts.meta_prob
        order = list(range(len(files)))
        rng.shuffle(order)
        sep = self.ids["<file_sep>"]
        parts: list = [self.ids["<repo_name>"], repo] if with_meta else []
        for i in order:
            path, content = files[i]
            parts += [sep, f"{path}\n{content}" if with_meta else content]
        return _merge(parts)


def _merge(parts: list) -> Document:
    """Join adjacent strings and drop empty ones."""
    out: list = []
    for p in parts:
        if isinstance(p, str):
            if not p:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += p
                continue
        out.append(p)
    return tuple(out)
