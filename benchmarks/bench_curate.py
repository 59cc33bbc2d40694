"""Curation benchmarks, each stage against the reference way of doing it, in one run.

    .venv/bin/python benchmarks/bench_curate.py [--no-write]

(a) MinHash near dedup on the stdlib with planted near-duplicates (`stdlib_corpus.build`):
    ours (datatrove signatures with code shingles, its bucket stage, our ranked clusters; 25 x 10,
    sha1 32-bit) vs bigcode's `minhash_deduplication.py` approach (datasketch MinHash, 256
    permutations, default scheme, MinHashLSH threshold 0.7, union-find, one process). Recall: of
    the pairs at exact Jaccard >= 0.7, the share whose documents end in one cluster.
(b) PII on the non-test stdlib plus files with planted secrets: ours (`Redactor`, in memory,
    prefiltered) vs bigcode's per file: its email and IP regexes, then detect-secrets `scan_file`
    on a temporary file with its plugin list. Recall: planted AWS key ids and secrets, GitHub
    tokens and JWTs (the types both cover).
Throughput is MB (and documents) per CPU-second of this process. Writes a section under
"## Curation" in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starcoder.curation.config import NearDedupConfig, PIIConfig  # noqa: E402
from starcoder.curation.dedup import code_tokens  # noqa: E402
from starcoder.curation.stdlib_corpus import build, planted_secrets, secret_block, stdlib_files  # noqa: E402


def shingle_set(text: str) -> set[str]:
    t = code_tokens(text)
    return {" ".join(t[i:i + 5]) for i in range(len(t) - 4)}


def true_pairs(texts: list[str]) -> set[tuple[int, int]]:
    sets = [shingle_set(t) if len(code_tokens(t)) >= 10 else set() for t in texts]
    order = sorted(range(len(sets)), key=lambda i: len(sets[i]))
    pairs = set()
    for x, i in enumerate(order):
        for j in order[x + 1:]:
            if len(sets[i]) < 0.7 * len(sets[j]):
                break
            inter = len(sets[i] & sets[j])
            if inter and inter / (len(sets[i]) + len(sets[j]) - inter) >= 0.7:
                pairs.add((min(i, j), max(i, j)))
    return pairs


def union_find(n: int, edges) -> list[int]:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in edges:
        parent[find(a)] = find(b)
    return [find(i) for i in range(n)]


def ours_minhash(texts: list[str], tmp: Path) -> list[int]:
    from datatrove.data import Document
    from datatrove.pipeline.dedup import MinhashDedupBuckets
    from starcoder.curation.dedup import CodeMinhashSignature, minhash_config, read_pairs
    cfg = NearDedupConfig()
    sig = CodeMinhashSignature(str(tmp / "sig"), cfg)
    sig.run((Document(text=t, id=str(i)) for i, t in enumerate(texts)), 0, 1)
    for b in range(cfg.num_buckets):
        MinhashDedupBuckets(str(tmp / "sig"), str(tmp / "dups"), config=minhash_config(cfg)).run(
            None, b, cfg.num_buckets)
    return union_find(len(texts), ((a[1], b[1]) for a, b in read_pairs(tmp / "dups")))


def bigcode_minhash(texts: list[str], batch: bool = False) -> list[int]:
    """bigcode's script calls `MinHash.update` once per shingle; `batch` uses datasketch's
    `update_batch` instead (datasketch at its best)."""
    from datasketch import MinHash, MinHashLSH
    lsh = MinHashLSH(threshold=0.7, num_perm=256)
    sketches = {}
    for i, t in enumerate(texts):
        tokens = code_tokens(t)
        if len(tokens) < 10:
            continue
        m = MinHash(num_perm=256)
        grams = {" ".join(tokens[k:k + 5]) for k in range(len(tokens) - 4)}
        if batch:
            m.update_batch([g.encode() for g in grams])
        else:
            for g in grams:
                m.update(g.encode())
        lsh.insert(i, m)
        sketches[i] = m
    return union_find(len(texts), ((i, j) for i, m in sketches.items() for j in lsh.query(m) if j != i))


def recall(roots: list[int], pairs) -> float:
    return sum(roots[a] == roots[b] for a, b in pairs) / max(1, len(pairs))


def timed(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def bigcode_pii(texts: list[str]) -> list[set[str]]:
    from detect_secrets.core.scan import scan_file
    from detect_secrets.settings import transient_settings
    from starcoder.curation.pii import EMAIL, IP
    plugins = [{"name": n} for n in ("ArtifactoryDetector", "AWSKeyDetector", "AzureStorageKeyDetector",
               "CloudantDetector", "DiscordBotTokenDetector", "GitHubTokenDetector", "IbmCloudIamDetector",
               "IbmCosHmacDetector", "JwtTokenDetector", "MailchimpDetector", "NpmDetector",
               "SendGridDetector", "SlackDetector", "SoftlayerDetector", "StripeDetector", "TwilioKeyDetector")]
    plugins += [{"name": "Base64HighEntropyString", "limit": 4.5}, {"name": "HexHighEntropyString", "limit": 3}]
    found = []
    with transient_settings({"plugins_used": plugins}):
        for text in texts:
            values = {m.group(1) for m in EMAIL.finditer(text)} | {m.group() for m in IP.finditer(text)}
            with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                f.write(text)
            try:
                values |= {s.secret_value for s in scan_file(f.name)}
            finally:
                os.unlink(f.name)
            found.append(values)
    return found


def ours_pii(texts: list[str]) -> list[set[str]]:
    from starcoder.curation.pii import PIIScanner
    scanner = PIIScanner(PIIConfig())
    return [{f.value for f in scanner.scan(t)} for t in texts]


def key_recall(found: list[set[str]], planted: dict[int, dict]) -> float:
    hits = total = 0
    for i, values in planted.items():
        for kind in ("aws_access_key", "aws_secret_key", "github_token", "jwt"):
            total += 1
            hits += any(values[kind] in v or v in values[kind] and len(v) > 20 for v in found[i])
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(tmp / "corpus", seed=0, duplicates=200, secrets=0, humaneval=0)
        texts = [json.loads(line)["content"] for line in open(tmp / "corpus" / "corpus.jsonl")]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        pairs = true_pairs(texts)
        ours, t_ours = timed(ours_minhash, texts, tmp)
        ref, t_ref = timed(bigcode_minhash, texts)
        best, t_best = timed(bigcode_minhash, texts, True)
        rows.append(("MinHash: datatrove + code shingles (25x10)", len(texts), mb, t_ours, recall(ours, pairs)))
        rows.append(("MinHash: bigcode's script (datasketch `update` per shingle, 256)", len(texts), mb, t_ref,
                     recall(ref, pairs)))
        rows.append(("MinHash: datasketch `update_batch` (256)", len(texts), mb, t_best, recall(best, pairs)))
    rng = random.Random(0)
    texts = [t for _, t in stdlib_files()]
    planted = {}
    for i in rng.sample(range(len(texts)), 60):
        planted[len(texts)] = values = planted_secrets(rng)
        texts.append(texts[i][:3000] + secret_block(values))
    mb = sum(len(t.encode()) for t in texts) / 1e6
    ours, t_ours = timed(ours_pii, texts)
    ref, t_ref = timed(bigcode_pii, texts)
    rows.append(("PII: ours (in memory, prefiltered)", len(texts), mb, t_ours, key_recall(ours, planted)))
    rows.append(("PII: bigcode (temp file + scan_file per file)", len(texts), mb, t_ref, key_recall(ref, planted)))

    lines = ["| stage, method | docs | MB | CPU s | docs/CPU-s | MB/CPU-s | recall | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, (name, docs, size, cpu, rec) in enumerate(rows):
        ref_cpu = rows[1][3] if k < 3 else rows[4][3]  # bigcode's way of each stage
        lines.append(f"| {name} | {docs} | {size:.1f} | {cpu:.1f} | {docs / cpu:.0f} | {size / cpu:.2f} | "
                     f"{rec:.3f} | {ref_cpu / cpu:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    section = (f"## Curation\n\n`python benchmarks/bench_curate.py`: speed-up against bigcode's way (its script's "
               f"per-shingle `MinHash.update`; its per-file temp file + detect-secrets `scan_file`), "
               f"datasketch's `update_batch` shown too. (a) MinHash near dedup on the stdlib "
               f"with 200 planted near/exact copies, recall of the pairs at J >= 0.7; (b) PII on the non-test "
               f"stdlib plus 60 files of planted secrets, recall of planted AWS/GitHub/JWT keys (types both "
               f"cover). Per CPU-second of one process. Targets: MinHash >= 1.3x, PII >= 5x.\n\n"
               f"{datetime.date.today()}, 2-core AMD EPYC, shared/busy, Python {platform.python_version()}, "
               f"commit {commit}.\n\n{table}\n")
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text()
    if "## Curation" in text:
        head, _, rest = text.partition("## Curation")
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section
    results.write_text(text)


if __name__ == "__main__":
    main()
