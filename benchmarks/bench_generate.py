"""Decode speed of our generation (KV cache, and full recompute) against `transformers` generate
on the same exported tiny model, on CPU; KV-cache bytes per token of the presets; sandboxed
executions per second.

    python benchmarks/bench_generate.py [--preset tiny-sc2] [--prompt-len 32] [--new 128]
"""

from __future__ import annotations

import argparse
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


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decode_speed(args) -> list[tuple]:
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
            generate_ids(ours, lists, [args.new] * batch, set(), use_cache=cache)

        def run_hf():
            with torch.no_grad():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new,
                            min_new_tokens=args.new, do_sample=False, pad_token_id=0)

        tokens = batch * args.new
        t_hf = timed(run_hf, args.repeats)
        t_ours = timed(run_ours, args.repeats)
        t_nocache = timed(lambda: run_ours(cache=False), 1)
        rows.append((batch, tokens / t_ours, tokens / t_nocache, tokens / t_hf))
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"decode, {args.preset}, prompt {args.prompt_len}, {args.new} new tokens, greedy, fp32, "
          f"{args.threads} threads")
    print("| batch | ours, KV cache (tok/s) | ours, no cache (tok/s) | transformers generate (tok/s) "
          "| cache vs no cache | ours vs transformers |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, cached, nocache, hf in decode_speed(args):
        print(f"| {batch} | {cached:,.0f} | {nocache:,.0f} | {hf:,.0f} | {cached / nocache:.1f}x "
              f"| {cached / hf:.2f}x |")
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
