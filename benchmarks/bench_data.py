"""Data-path benchmarks, side by side with megatron-core 0.16.1 over the same files.

    .venv/bin/python benchmarks/bench_data.py [--quick] [--only loader,fim,index,preprocess]

(a) loader: samples/s of seq 8192 micro-batches, ours (`build_train_loader`, no FIM) vs
    megatron-core's `GPTDataset` through a `DataLoader` at its best worker count (no attention
    mask, as with flash attention), and the raw limit: a `numpy.memmap` copy of as many windows;
(b) fim: FIM at rate 0.5 (spm 0.5), tokens/s on one core with one tokenizer thread, ours
    (re-encoding around the cuts) vs re-encoding the parts whole (bigcode Megatron's algorithm);
(c) index: building the document/sample/shuffle indices for 100M documents (sizes only, a sparse
    .bin), time and peak memory, ours vs megatron-core's GPTDataset builder, each in a fresh process;
(d) preprocess: `starcoder preprocess` tokens/s per worker vs raw `tokenizers` `encode_batch` on
    one thread.

Prints one table and writes it under "## Data path" in benchmarks/RESULTS.md (--no-write to skip).
The real StarCoder2 tokenizer is used for (b) and (d) when found (../shared/tokenizers), otherwise
the tiny one. Timings are the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")

from starcoder.data.indexed import IndexedWriter, write_index  # noqa: E402

SEQ = 8192


def best_of(repeats: int, fn):
    """min wall time of fn() over repeats; fn returns (seconds, payload)."""
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda r: r[0])


def interleaved(repeats: int, fns: dict) -> dict:
    """Best (seconds, payload) of each fn, the fns run in turn so that a busy host hurts all alike."""
    runs: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: min(r, key=lambda x: x[0]) for name, r in runs.items()}


def default_tokenizer() -> str:
    for base in (os.environ.get("STARCODER_SHARED"), ROOT / ".." / "shared", "/work/shared"):
        if base and (Path(base) / "tokenizers/starcoder2/tokenizer.json").is_file():
            return str(Path(base) / "tokenizers/starcoder2/tokenizer.json")
    return "builtin:tiny"


def stdlib_code(max_files: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        if "test" in p.parts or "site-packages" in p.parts:
            continue
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if len(out) == max_files:
            break
    return out


# ---------------------------------------------------------------------------------------------
# (a) loader


def random_corpus(prefix: Path, tokens: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with IndexedWriter(prefix, np.uint16) as w:
        written = 0
        while written < tokens:
            sizes = np.clip(rng.lognormal(7.0, 1.0, size=4096).astype(np.int64), 16, 60000)
            w.add_documents(rng.integers(1, 49152, size=int(sizes.sum()), dtype=np.uint16), sizes)
            written += int(sizes.sum())


class _Tok:  # what megatron-core's GPTDataset needs from a tokenizer
    vocab_size, eod, pad = 49152, 0, -1
    special_tokens_dict: dict = {}
    unique_identifiers = {"class": "bench"}


def bench_loader(work: Path, samples: int, micro: int, repeats: int) -> list[tuple]:
    import torch

    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split
    from starcoder.config import load_config
    from starcoder.data import build_train_loader, load_tokenizer

    prefix = work / "loader"
    random_corpus(prefix, int(samples * SEQ * 1.2) + 10 * SEQ)
    steps = samples // micro
    cfg = load_config("tiny-sc2", [
        f"data.paths=['{prefix}']", f"data.cache_dir={work / 'cache'}", "data.split=100,0,0",
        "data.fim_rate=0.0", f"model.max_position_embeddings={SEQ}", f"train.seq_length={SEQ}",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={micro}", f"train.max_steps={steps}"])
    tok = load_tokenizer("builtin:tiny")

    def ours():
        it = build_train_loader(cfg, tok, dp_rank=0, dp_size=1, consumed_samples=0)
        next(it)  # indices built and loaded
        t = time.perf_counter()
        for _ in range(steps - 1):
            batch = next(it)
        return time.perf_counter() - t, batch["tokens"].shape

    t_ours, shape = best_of(repeats, ours)
    ours_rate = (steps - 1) * micro / t_ours

    config = GPTDatasetConfig(random_seed=1234, sequence_length=SEQ, tokenizer=_Tok(), split="100,0,0",
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False, path_to_cache=str(work / "mcore-cache"))
    indexed = IndexedDataset(str(prefix))
    dataset = GPTDataset(indexed, str(prefix), np.arange(len(indexed), dtype=np.int32), samples,
                         Split.train, config)
    batches = [list(range(i * micro, (i + 1) * micro)) for i in range(steps)]
    peer = {}
    for workers in (0, 1, 2, 4):
        def theirs():
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                                 persistent_workers=False)
            it = iter(loader)
            next(it)  # workers started
            t = time.perf_counter()
            for batch in it:
                pass
            return time.perf_counter() - t, batch["tokens"].shape
        peer[workers] = (steps - 1) * micro / best_of(repeats, theirs)[0]
    best_workers = max(peer, key=peer.get)

    mm = np.memmap(f"{prefix}.bin", dtype=np.uint16, mode="r")
    starts = np.random.default_rng(1).integers(0, len(mm) - SEQ - 1, size=steps * micro)
    out = np.empty((micro, SEQ + 1), dtype=np.uint16)

    def raw():
        t = time.perf_counter()
        for i in range(steps):
            for j in range(micro):
                s = starts[i * micro + j]
                out[j] = mm[s:s + SEQ + 1]
        return time.perf_counter() - t, None

    raw_rate = steps * micro / best_of(repeats, raw)[0]
    detail = ", ".join(f"{w} workers {r:,.0f}" for w, r in peer.items())
    return [
        ("(a) loader, samples/s at seq 8192 (micro 8)", f"{ours_rate:,.0f}",
         f"{peer[best_workers]:,.0f} ({best_workers} workers)", ours_rate / peer[best_workers], ">= 5x",
         f"megatron-core: {detail}; tokens {tuple(shape)} int64 + loss_mask vs tokens/labels/loss_mask/position_ids"),
        ("(a) raw memmap copy of as many windows, samples/s", f"{raw_rate:,.0f}", "", ours_rate / raw_rate,
         "limit", "uint16 copy, no conversion (ours/raw in the ratio column)"),
    ]


# ---------------------------------------------------------------------------------------------
# (b) FIM


def bench_fim(tokenizer: str, tokens: int, repeats: int) -> list[tuple]:
    from starcoder.data.fim import FimTransform, sample_rng
    from starcoder.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    stream: list[int] = []
    for ids in tok.encode_batch(stdlib_code(2000)):
        stream += ids + [tok.eod_id]
        if len(stream) >= tokens:
            break
    arr = np.array(stream, dtype=np.int64)
    samples = [arr[i:i + SEQ + 1] for i in range(0, len(arr) - SEQ - 1, SEQ)]
    def timed(fim):
        def run():
            t = time.perf_counter()
            for i, s in enumerate(samples):
                fim(s, sample_rng(1234, 0, 0, i))
            return time.perf_counter() - t, None
        return run

    best = interleaved(repeats, {fast: timed(FimTransform(tok, 0.5, 0.5, fast=fast)) for fast in (True, False)})
    rates = {fast: len(samples) * (SEQ + 1) / best[fast][0] for fast in best}
    name = Path(tokenizer).parent.name if tokenizer.endswith(".json") else tokenizer
    return [("(b) FIM rate 0.5, tokens/s on one core", f"{rates[True]:,.0f}", f"{rates[False]:,.0f}",
             rates[True] / rates[False], ">= 3M tokens/s",
             f"peer: full re-encoding of the three parts (bigcode Megatron); {name} tokenizer, "
             f"{len(samples)} samples of stdlib code")]


# ---------------------------------------------------------------------------------------------
# (c) index build for 100M documents

OURS_INDEX = """
import json, sys, time
from pathlib import Path
from starcoder.data.dataset import IndexCache, source_samples
from starcoder.data.indexed import IndexedTokens
def status(key):  # VmRSS / VmHWM (peak) of this process image, in bytes
    line = next(l for l in open('/proc/self/status') if l.startswith(key))
    return int(line.split()[1]) * 1024
rss0 = status('VmRSS')
t = time.perf_counter()
data = IndexedTokens(sys.argv[1])
s = source_samples(data, 0, (0, len(data)), int(sys.argv[2]), 8192, 1234, IndexCache(Path(sys.argv[3])))
dt = time.perf_counter() - t
peak = status('VmHWM')
print(json.dumps({"seconds": dt, "peak": peak - rss0, "samples": len(s.sample_idx) - 1}))
"""

MCORE_INDEX = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split
class Tok:
    vocab_size, eod, pad = 49152, 0, -1
    special_tokens_dict = {}
    unique_identifiers = {"class": "bench"}
def status(key):  # VmRSS / VmHWM (peak) of this process image, in bytes
    line = next(l for l in open('/proc/self/status') if l.startswith(key))
    return int(line.split()[1]) * 1024
rss0 = status('VmRSS')
t = time.perf_counter()
cfg = GPTDatasetConfig(random_seed=1234, sequence_length=8192, tokenizer=Tok(), split="100,0,0",
                       reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                       create_attention_mask=False, path_to_cache=sys.argv[3])
data = IndexedDataset(sys.argv[1])
ds = GPTDataset(data, sys.argv[1], np.arange(len(data), dtype=np.int32), int(sys.argv[2]), Split.train, cfg)
dt = time.perf_counter() - t
peak = status('VmHWM')
print(json.dumps({"seconds": dt, "peak": peak - rss0, "samples": len(ds.sample_index) - 1}))
"""


def bench_index(work: Path, docs: int) -> list[tuple]:
    prefix = work / f"sizes{docs}"
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4000, size=docs, dtype=np.int32)
    total = int(sizes.sum(dtype=np.int64))
    write_index(f"{prefix}.idx", sizes, np.uint16)
    del sizes
    with open(f"{prefix}.bin", "wb") as f:  # sparse: only the sizes matter
        f.truncate(total * 2)
    samples = (total - 1) // SEQ  # one epoch
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    results = {}
    for name, script in (("ours", OURS_INDEX), ("megatron-core", MCORE_INDEX)):
        cache = work / f"cache-{name}"
        out = subprocess.run([sys.executable, "-c", script, str(prefix), str(samples), str(cache)],
                             capture_output=True, text=True, env=env, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, peer = results["ours"], results["megatron-core"]
    gib = 2**30
    return [
        (f"(c) index build, {docs / 1e6:g}M documents, seconds", f"{ours['seconds']:.2f}",
         f"{peer['seconds']:.2f}", peer["seconds"] / ours["seconds"], ">= 3x faster",
         f"{samples:,} samples of 8192 (one epoch, {total / 1e9:.0f}B tokens); ratio = peer/ours"),
        ("(c) index build, peak memory above start, GiB", f"{ours['peak'] / gib:.2f}",
         f"{peer['peak'] / gib:.2f}", peer["peak"] / max(ours["peak"], 1), "no more than peer",
         "peak RSS (VmHWM) minus RSS after imports, fresh process each; ratio = peer/ours"),
    ]


# ---------------------------------------------------------------------------------------------
# (d) preprocess


def bench_preprocess(work: Path, tokenizer: str, megabytes: float, repeats: int) -> list[tuple]:
    from tokenizers import Tokenizer

    from starcoder.data import preprocess_corpus

    texts, size = [], 0
    code = stdlib_code(4000)
    while size < megabytes * 2**20:
        for t in code:
            texts.append(t)
            size += len(t)
            if size >= megabytes * 2**20:
                break
    with open(work / "corpus.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"content": t}) + "\n")
    raw_tok = Tokenizer.from_file(tokenizer) if tokenizer.endswith(".json") else None
    if raw_tok is None:
        from starcoder.data import load_tokenizer
        raw_tok = load_tokenizer(tokenizer).backend

    def raw(method="encode_batch"):
        def run():
            t = time.perf_counter()
            n = sum(len(e.ids) for e in getattr(raw_tok, method)(texts, add_special_tokens=False))
            return time.perf_counter() - t, n
        return run

    def ours(workers):
        def run():
            rep = preprocess_corpus(work / "corpus.jsonl", tokenizer, str(work / f"pre{workers}"),
                                    workers=workers, progress=False)
            return rep.seconds, rep.tokens
        return run

    best = interleaved(repeats, {"raw": raw(), "fast": raw("encode_batch_fast"), 1: ours(1), 2: ours(2)})
    raw_rate = best["raw"][1] / best["raw"][0]
    fast_rate = best["fast"][1] / best["fast"][0]
    rows = []
    for workers in (1, 2):
        t, n = best[workers]
        per_worker = n / t / workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        note = f"; {cores} cores shared by the workers and the main process" if workers > 1 else ""
        rows.append((f"(d) preprocess, tokens/s per worker ({workers} worker{'s' if workers > 1 else ''})",
                     f"{per_worker:,.0f}", f"{raw_rate:,.0f}", per_worker / raw_rate, ">= 0.8x",
                     f"peer: encode_batch on one thread (encode_batch_fast, which ours calls: "
                     f"{fast_rate:,.0f}); ours end to end: read, parse, write, worker start-up; "
                     f"{size / 2**20:.0f} MiB of stdlib code{note}"))
    return rows


# ---------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {cores} cores, {mem:.0f} GiB"


def table(rows: list[tuple]) -> str:
    head = "| benchmark | ours | peer | ratio | target | notes |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(f"| {b} | {o} | {p} | {r:.2f}x | {t} | {n} |" for b, o, p, r, t, n in rows)


def write_results(text: str) -> Path:
    path = ROOT / "benchmarks" / "RESULTS.md"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find("## Data path")
    if start >= 0:
        nxt = old.find("\n## ", start + 1)
        old = old[:start] + old[nxt + 1:] if nxt >= 0 else old[:start]
    path.write_text(old.rstrip("\n") + "\n\n" + text + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, minutes less)")
    parser.add_argument("--only", default="loader,fim,index,preprocess", help="comma-separated subset")
    parser.add_argument("--tokenizer", default=None, help="for fim and preprocess (default: real StarCoder2 if found)")
    parser.add_argument("--index-docs", type=int, default=None, help="documents for (c) (default 100M; quick 10M)")
    parser.add_argument("--repeats", type=int, default=None, help="best of N (default 3; quick 1)")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    only = set(args.only.split(","))
    repeats = args.repeats or (1 if args.quick else 3)
    tokenizer = args.tokenizer or default_tokenizer()
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        if "loader" in only:
            rows += bench_loader(work, 800 if args.quick else 4000, 8, repeats)
        if "fim" in only:
            rows += bench_fim(tokenizer, 200_000 if args.quick else 2_000_000, repeats)
        if "index" in only:
            rows += bench_index(work, args.index_docs or (10_000_000 if args.quick else 100_000_000))
        if "preprocess" in only:
            rows += bench_preprocess(work, tokenizer, 2 if args.quick else 16, min(repeats, 2))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    stamp = (f"{datetime.date.today().isoformat()}, {machine()}, commit {commit}{' (dirty)' if dirty else ''}"
             f"{', --quick' if args.quick else ''}")
    text = f"## Data path\n\n{stamp}. Produced by `benchmarks/bench_data.py`.\n\n{table(rows)}"
    print(text)
    if not args.no_write:
        print(f"\nwrote {write_results(text)}")


if __name__ == "__main__":
    main()
