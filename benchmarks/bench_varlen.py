"""Varlen attention's tile skipping, seen through the Triton interpreter on CPU.

`PYTHONPATH=. TRITON_INTERPRET=1 python benchmarks/bench_varlen.py`: causal attention over one row of 1024
tokens (2 query heads, 1 KV head, head dim 32, 64 x 64 tiles), plain against packed documents of
equal length; forward + backward CPU time (process time, so other load on the machine counts
little), and the key tiles the forward visits per query block, counted from the same range rule
the kernel uses. Interpreted time is proportional to the tiles visited; on a GPU the ratio shows
up as saved FLOPs (compiled timings: benchmarks/kernels.py on a GPU machine).
"""

from __future__ import annotations

import importlib
import time

import torch

from starcoder.kernels import flash_attention

fa = importlib.import_module("starcoder.kernels.flash_attention")
SEQ, TILE = 1024, 64


def visited_tiles(doc_len: int | None) -> int:
    """Forward key tiles over all query blocks: causal [0, end of block), tightened to
    [start of the first query's document, ...)."""
    total = 0
    for start in range(0, SEQ, TILE):
        lo = 0 if doc_len is None else start // doc_len * doc_len // TILE * TILE
        total += (start + TILE - lo) // TILE
    return total


def seconds(document_ids) -> float:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, SEQ, 2, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(1, SEQ, 1, 32, generator=g, requires_grad=True) for _ in range(2))
    start = time.process_time()
    out = flash_attention(q, k, v, document_ids=document_ids)
    out.sum().backward()
    return time.process_time() - start


def main() -> None:
    fa.INTERPRETER_BLOCKS = {"fwd": (TILE, TILE), "dkdv": (TILE, TILE), "dq": (TILE, TILE)}
    seconds(torch.zeros(1, SEQ, dtype=torch.long))  # warm-up: first-call costs out of the rows
    plain = seconds(None)
    print("| documents | tiles visited (fwd) | fwd+bwd CPU s | vs plain |")
    print(f"| plain causal | {visited_tiles(None)} | {plain:.2f} | 1.00 |")
    for docs in (2, 8, 32):
        ids = torch.arange(SEQ)[None] // (SEQ // docs)
        t = seconds(ids)
        print(f"| {docs} x {SEQ // docs} | {visited_tiles(SEQ // docs)} | {t:.2f} | {t / plain:.2f} |")


if __name__ == "__main__":
    main()
