"""`starcoder preprocess` on one huge line: peak memory (the child's VmHWM) and time.

    .venv/bin/python benchmarks/bench_long_line.py [--mb 50] [--checkout DIR] [--tokenizer SPEC]

The line is the running interpreter's standard library (sorted, real code) repeated to `--mb`
megabytes, as one JSON record. The preprocess runs in a fresh child process (`--workers 1`,
tokenising in that process) that prints its own VmHWM at exit. `--checkout DIR` runs another
copy of the package (e.g. `git archive` of an older commit with the built `_helpers*.so`), which
is how the before/after pair in benchmarks/RESULTS.md was measured. Default tokenizer: the real
StarCoder2 one when ../shared/tokenizers has it, else builtin:tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys
from starcoder.cli import main
rc = main(sys.argv[1:])
hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))
print('VMHWM_KB', hwm.split()[1], file=sys.stderr)
sys.exit(rc)
"""


def make_line(path: Path, megabytes: float) -> int:
    root = Path(sysconfig.get_paths()["stdlib"])
    code = "".join(p.read_text(errors="replace") for p in sorted(root.glob("*.py")))
    target = int(megabytes * 1e6)
    text = (code * (target // len(code) + 1))[:target]
    path.write_text(json.dumps({"content": text}) + "\n")
    return len(text)


def default_tokenizer() -> str:
    for base in (os.environ.get("STARCODER_SHARED"), ROOT.parent / "shared", "/work/shared"):
        if base and (Path(base) / "tokenizers/starcoder2/tokenizer.json").is_file():
            return str(Path(base) / "tokenizers/starcoder2/tokenizer.json")
    return "builtin:tiny"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--checkout", default=str(ROOT), help="the package copy to run (default: this one)")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()
    tokenizer = args.tokenizer or default_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "line.jsonl"
        chars = make_line(jsonl, args.mb)
        # `python -c` puts the working directory first on sys.path: run in the checkout.
        env = dict(os.environ, PYTHONPATH=args.checkout, OMP_NUM_THREADS="1")
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", CHILD, "preprocess", "--input", str(jsonl),
                              "--tokenizer", tokenizer, "--output-prefix", str(Path(tmp) / "out"),
                              "--no-progress"], env=env, cwd=args.checkout, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    hwm = [line.split()[1] for line in res.stderr.splitlines() if line.startswith("VMHWM_KB")]
    if res.returncode or not hwm:
        sys.exit(f"preprocess failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    tokens = next((line for line in res.stdout.splitlines() if line.startswith("wrote")), "")
    print(f"{chars / 1e6:.0f} MB line, {Path(tokenizer).parent.name or tokenizer}: peak RSS "
          f"{int(hwm[0]) / 2**20:.2f} GiB, {seconds:.1f} s wall ({tokens})")


if __name__ == "__main__":
    main()
