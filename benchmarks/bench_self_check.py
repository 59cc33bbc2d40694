"""Start-up cost of the kernel self-check: `GPT.set_kernels("auto")` on a preset's shapes, per
kernel and in total. On a GPU this is the real path; without one, `AUTO_DEVICE` is pointed at
the CPU and the kernels run under the Triton interpreter (TRITON_INTERPRET=1), as in the tests.

    TRITON_INTERPRET=1 python benchmarks/bench_self_check.py [--preset tiny-sc2] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout

from starcoder.config import load_config
from starcoder.models import GPT, self_check
from starcoder.models import attention as attention_module
from starcoder.training.precision import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-sc2")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention_module.AUTO_DEVICE = device.type
    cfg = load_config(args.preset, ["model.num_layers=1"]).model  # shapes only: one block is enough
    with torch.device("meta"):
        model = GPT(cfg)
    shapes = self_check.Shapes.of(cfg)
    print(f"{args.preset} ({shapes}), {args.dtype}, {device.type}")
    checks = dict(self_check.CHECKS)
    for name, check in checks.items():  # one at a time, for the per-kernel times
        self_check._outcome.clear()
        self_check.CHECKS = {name: check}
        start = time.perf_counter()
        passed = self_check.run_self_checks(device, DTYPES[args.dtype], shapes)[name]
        print(f"  {name:22s} {time.perf_counter() - start:7.1f} s  {'pass' if passed else 'FAIL'}")
    self_check._outcome.clear()
    self_check.CHECKS = checks
    start = time.perf_counter()
    model.set_kernels("auto", device, DTYPES[args.dtype])  # the path a run takes, all kernels
    print(f"  set_kernels(auto) total {time.perf_counter() - start:7.1f} s")


if __name__ == "__main__":
    main()
