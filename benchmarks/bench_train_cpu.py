"""Training throughput on CPU: `starcoder train` against a plain `transformers` loop, same run.

Both train tiny-sc2's shape (4 layers x 256, GQA 2, window 64, 8192 vocabulary) on micro-batches
of 8 x 256 tokens with AdamW (betas 0.9/0.95, weight decay 0.1, clipping 1.0) on the same number
of threads. Ours is the whole product path as the preset configures it: the real data loader over
the standard-library corpus (the demo's, FIM on, 2 loader worker processes), logging every 10
steps to metrics.jsonl and the console, and the final checkpoint save, all inside the timed window. The peer is `Starcoder2ForCausalLM` on token batches already in
memory (no data loading, logging or saving). The first `--warmup` steps of each are not timed;
each side runs `--repeats` times, alternating, and the best run counts (the machine may be shared).

    python benchmarks/bench_train_cpu.py [--steps 40] [--warmup 5] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def ours(corpus: str, workdir: Path, steps: int, warmup: int) -> float:
    """Tokens/s of `starcoder train` over steps warmup+1..steps, including the final save."""
    from starcoder.config import load_config

    run = workdir / "run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config("tiny-sc2", [f"data.paths=[{corpus}]", f"train.output_dir={run}",
                                   f"train.max_steps={steps}", "log.every=10", "log.tensorboard=false",
                                   "log.progress_bar=false"])
    return timed_train(cfg, warmup)


def timed_train(cfg, warmup: int) -> float:
    """Tokens/s of `starcoder.training.train(cfg)` from the end of step `warmup` to the end of the
    run (its final save included)."""
    from starcoder.training import trainer

    marks = {}
    real = trainer.Trainer._account

    def account(self, loss, norm):
        real(self, loss, norm)
        if self.state.step == warmup:
            marks["start"] = time.perf_counter()

    trainer.Trainer._account = account
    try:
        trainer.train(cfg)
    finally:
        trainer.Trainer._account = real
    seconds = time.perf_counter() - marks["start"]
    return (cfg.train.max_steps - warmup) * cfg.train.global_batch_size * cfg.train.seq_length / seconds


def peer(steps: int, warmup: int) -> float:
    """Tokens/s of a plain transformers training loop of the same shape."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    from starcoder.config import load_config

    cfg = load_config("tiny-sc2")
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    model = Starcoder2ForCausalLM(Starcoder2Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
        sliding_window=m.sliding_window, rope_theta=m.rope_theta, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                            eps=t.adam_eps, weight_decay=t.weight_decay)
    batches = [torch.randint(0, m.vocab_size, (t.micro_batch_size, t.seq_length + 1)) for _ in range(8)]
    start = None
    for step in range(steps):
        tokens = batches[step % len(batches)]
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 == warmup:
            start = time.perf_counter()
    return (steps - warmup) * t.micro_batch_size * t.seq_length / (time.perf_counter() - start)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores available, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="corpus cache and run folder (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from starcoder.cli.demo import prepare_corpus

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_cpu_"))
    corpus = prepare_corpus(workdir / "data", max_files=200)
    results = {"ours": [], "peer": []}
    for _ in range(args.repeats):
        results["ours"].append(ours(corpus, workdir, args.steps, args.warmup))
        results["peer"].append(peer(args.steps, args.warmup))
    best = {k: max(v) for k, v in results.items()}
    tokens_per_step = 8 * 256
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    print(f"\ntiny-sc2, micro-batch 8 x 256, AdamW, {args.threads} threads, {args.steps - args.warmup} "
          f"timed steps, best of {args.repeats}")
    print(f"machine: {machine()}; commit {commit}")
    print("| training loop | tokens/s | ms/step | vs transformers |")
    print("|---|---:|---:|---:|")
    for name, label in (("ours", "`starcoder train` (data, logging, checkpoint)"),
                        ("peer", "plain `transformers` Starcoder2ForCausalLM")):
        print(f"| {label} | {best[name]:,.0f} | {1000 * tokens_per_step / best[name]:.0f} | "
              f"{best[name] / best['peer']:.2f}x |")
    print(f"all runs (tokens/s): ours {[round(x) for x in results['ours']]}, "
          f"transformers {[round(x) for x in results['peer']]}")


if __name__ == "__main__":
    main()
