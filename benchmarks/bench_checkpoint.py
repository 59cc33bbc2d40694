"""What checkpoint checksums cost, per GB written and read.

    .venv/bin/python benchmarks/bench_checkpoint.py [--gb 1.0] [--repeats 3] [--no-write]

Saves `--gb` GB of fp32 tensors with `torch.distributed.checkpoint` (the trainer's safetensors
storage, one process), then times, best of `--repeats`:
  - save: `dcp.save` of the tensors, and the manifest's xxh3 of the files written (the trainer
    checksums after writing, from the page cache);
  - load: `dcp.load` of the tensors, and verifying the files against the manifest (sizes and
    xxh3, `train.verify_checksums`), also from the page cache: on a cold parallel filesystem
    the read itself, not the CRC, is what costs;
  - the hash alone on bytes in memory: xxh3 (used), zlib CRC-32 and BLAKE2b.
Prints one table and writes it under "## Checkpoint checksums" in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from starcoder.convert.checkpoints import check_files, describe_file  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    per = 16 << 20  # 64 MB fp32 tensors
    tensors = {f"t{i}": torch.randn(per) for i in range(max(1, round(args.gb * 1e9 / (4 * per))))}
    gb = sum(t.numel() * 4 for t in tensors.values()) / 1e9
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = Path(tmp)
        save = best(lambda: dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(
            str(folder), save_distributed=True), no_dist=True), args.repeats)
        names = sorted(p.name for p in folder.glob("*.safetensors"))
        manifest = {"files": {}}
        crc_write = best(lambda: manifest["files"].update(
            {n: describe_file(folder / n) for n in names}), args.repeats)
        load = best(lambda: dcp.load({k: torch.empty_like(v) for k, v in tensors.items()},
                                     storage_reader=HuggingFaceStorageReader(str(folder)),
                                     no_dist=True), args.repeats)
        crc_read = best(lambda: check_files(folder, manifest, names), args.repeats)
    rows.append(("save (dcp.save)", save, None))
    rows.append(("xxh3 of the files written (manifest)", crc_write, save))
    rows.append(("load (dcp.load)", load, None))
    rows.append(("verify sizes + xxh3 on load", crc_read, load))
    data = os.urandom(256 << 20)
    hashes = [("xxhash.xxh3_64 (used)", lambda: xxhash.xxh3_64(data).digest()),
              ("zlib.crc32", lambda: zlib.crc32(data)),
              ("hashlib.blake2b", lambda: hashlib.blake2b(data).digest())]
    hash_rows = [(name, (256 << 20) / 1e9 / best(fn, args.repeats)) for name, fn in hashes]

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    lines = [f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores (2-core AMD EPYC, shared/busy), torch {torch.__version__}, "
             f"commit {commit}. Produced by `benchmarks/bench_checkpoint.py --gb {args.gb}` "
             f"({gb:.2f} GB of fp32 tensors, one process, page cache warm, best of {args.repeats}).",
             "", "| step | seconds | s per GB | vs the save / load itself |", "|---|---:|---:|---:|"]
    for name, seconds, base in rows:
        ratio = f"+{100 * seconds / base:.0f}%" if base else ""
        lines.append(f"| {name} | {seconds:.2f} | {seconds / gb:.2f} | {ratio} |")
    lines += ["", "| hash, bytes in memory | GB/s (one core) |", "|---|---:|"]
    lines += [f"| {name} | {rate:.2f} |" for name, rate in hash_rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(Path(__file__).with_name("RESULTS.md"), "## Checkpoint checksums", table)


def write_section(path: Path, title: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{body}\n"
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + f"{title}\n\n{body}\n" + (text[end:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    main()
