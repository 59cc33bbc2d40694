"""Fine-tuning rows: best-fit packing time and fill, and micro-batches per second.

    PYTHONPATH=. python benchmarks/bench_packing.py [--examples 100000] [--seq 1280]

Example lengths are lognormal around 400 tokens (SelfCodeAlign-like pairs), rows seq + 1 tokens.
The loader part writes a synthetic fine-tuning dataset (random ids and masks) to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from starcoder.data.indexed import IndexedWriter
from starcoder.data.packing import ExampleBatches, example_rows, place


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--seq", type=int, default=1280)
    parser.add_argument("--micro", type=int, default=8)
    args = parser.parse_args()
    width = args.seq + 1
    rng = np.random.default_rng(0)
    lengths = np.minimum(np.exp(rng.normal(np.log(400), 0.6, args.examples)).astype(np.int64) + 2, width)
    start = time.perf_counter()
    rows = place(lengths, width, True, seed=1, split=0)
    seconds = time.perf_counter() - start
    fill = lengths.sum() / (len(rows) * width)
    print(f"place: {args.examples:,} examples -> {len(rows):,} rows in {seconds:.2f}s, fill {fill:.4f} "
          f"(lower bound {int(np.ceil(lengths.sum() / width)):,} rows)")

    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "ft")
        tokens, masks = IndexedWriter(prefix, np.uint16), IndexedWriter(f"{prefix}_loss_mask", np.uint8)
        for n in lengths.tolist():
            tokens.add_document(rng.integers(1, 8000, n))
            masks.add_document(np.arange(n) >= n // 3)
        masks.finish()
        tokens.finish({"loss_mask": "ft_loss_mask"})
        for pack in (False, True):
            start = time.perf_counter()
            examples, built = example_rows([prefix], "100,0,0", 0, args.seq, pack, 1, True)
            build = time.perf_counter() - start
            batches = ExampleBatches(examples, built, args.seq, 1, 0, 0, True, False, pack)
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < 3.0:
                batches[list(range(count * args.micro, (count + 1) * args.micro))]
                count += 1
            rate = count * args.micro / (time.perf_counter() - start)
            print(json.dumps({"pack": pack, "rows": len(built), "rows_build_s": round(build, 2),
                              "rows_per_s": round(rate), "tokens_per_s": round(rate * width)}))


if __name__ == "__main__":
    main()
