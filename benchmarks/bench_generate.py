"""Decode speed of our generation (KV cache, and full recompute) against `transformers` generate
on the same exported tiny model, on CPU; KV-cache bytes per token of the presets; sandboxed
executions per second.

    python benchmarks/bench_generate.py [--preset tiny-sc2] [--prompt-len 32] [--new 128]
        [--repeats 7] [--threads 1] [--no-cache]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, and tests/

from starcoder.config import load_config
from starcoder.generation import generate_ids, kv_bytes_per_token, load_generator

PRESETS = ["santacoder", "starcoderbase-1b", "starcoder-15b", "starcoder2-3b", "starcoder2-7b",
           "starcoder2-15b"]


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_speed(args) -> list[dict]:
    """Ours and theirs interleaved in one process (A, B, A, B, ...), so that a load change on a
    shared machine hits both; per repeat a ratio, and medians over the repeats."""
    from transformers import AutoModelForCausalLM
    from tests.models import write_tiny_model

    folder = Path(tempfile.mkdtemp())
    paths = write_tiny_model(folder, args.preset, std=0.02)
    ours = load_generator(paths["native"]).model
    hf = AutoModelForCausalLM.from_pretrained(paths["hf"]).eval()
    rows = []
    for batch in (1, 16):
        prompts = torch.randint(1, 8000, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
        lists = prompts.tolist()

        def run_ours(cache=True):
            # No stop ids: every row decodes exactly args.new tokens, as min_new_tokens forces there.
            return generate_ids(ours, lists, [args.new] * batch, set(), use_cache=cache)

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  max_new_tokens=args.new, min_new_tokens=args.new,
                                  do_sample=False, pad_token_id=0)
            return out[:, args.prompt_len:].tolist()

        same = run_ours() == run_hf()  # also the warm-up of both, not timed
        tokens = batch * args.new
        t_ours, t_hf = [], []
        for _ in range(args.repeats):
            t_ours.append(seconds(run_ours))
            t_hf.append(seconds(run_hf))
        t_nocache = seconds(lambda: run_ours(cache=False)) if args.no_cache else None
        rows.append(dict(batch=batch, ours=tokens / statistics.median(t_ours),
                         hf=tokens / statistics.median(t_hf),
                         nocache=None if t_nocache is None else tokens / t_nocache,
                         ratios=[h / o for o, h in zip(t_ours, t_hf)], same=same))
    return rows


def sandbox_speed(n: int = 100) -> float:
    from starcoder.eval.sandbox import Sandbox

    box = Sandbox()
    box.check()
    start = time.perf_counter()
    results = box.run_many(["assert sum(range(10)) == 45"] * n)
    assert all(r.passed for r in results)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-sc2")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for both")
    parser.add_argument("--no-cache", action="store_true",
                        help="also time our full recompute without a cache (once; slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"decode, {args.preset}, prompt {args.prompt_len}, {args.new} new tokens, greedy, fp32, "
          f"{args.threads} threads, median of {args.repeats} interleaved repeats after a warm-up")
    rows = decode_speed(args)
    print("| batch | ours, KV cache (tok/s) | transformers generate (tok/s) | ours vs transformers "
          "(median) | per repeat | same tokens | ours, no cache (tok/s) |")
    print("|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        nocache = "-" if r["nocache"] is None else f"{r['nocache']:,.0f}"
        print(f"| {r['batch']} | {r['ours']:,.0f} | {r['hf']:,.0f} | "
              f"{statistics.median(r['ratios']):.2f}x | "
              f"{' '.join(f'{x:.2f}' for x in r['ratios'])} | {'yes' if r['same'] else 'no'} | "
              f"{nocache} |")
    print("\nKV-cache bytes per token (bf16)")
    print("| preset | layers | KV heads | head dim | bytes/token |")
    print("|---|---:|---:|---:|---:|")
    for name in PRESETS + ["starcoder2-15b:mha"]:
        preset, _, variant = name.partition(":")
        m = load_config(preset).model
        groups = m.num_attention_heads if variant == "mha" else m.num_query_groups
        label = f"{preset} as MHA ({groups} KV heads)" if variant else preset
        print(f"| {label} | {m.num_layers} | {groups} | {m.head_dim} | "
              f"{kv_bytes_per_token(m.num_layers, groups, m.head_dim):,} |")
    print(f"\nsandboxed executions/s (bubblewrap, trivial program): {sandbox_speed():.1f}")


if __name__ == "__main__":
    main()
