"""LoRA's cost on CPU: memory of full fine-tuning against LoRA, and `starcoder train` with LoRA
against a plain `peft` + `transformers` loop of the same shape.

Memory (measured on the live trainer after its steps): trainable parameters, their fp32
gradients, the AdamW state (`exp_avg`, `exp_avg_sq`: every tensor in `optimizer.state`), and the
checkpoint folder, for the same model fine-tuned fully and with LoRA (Astraios: r 8, alpha 16,
dropout 0.05; q_proj + kv_proj = GPTBigCode's c_attn, out_proj and fc_out = both c_proj).

Throughput: tiny-sc1 (GPTBigCode, 4 layers x 256, MQA) from the same base, micro-batch 8 x 256,
AdamW, LoRA as above. `--objective lm` trains on the standard-library corpus; `--objective sft`
on instruction/response pairs built from the standard library's functions
(`tools/stdlib_instructions.py`, `starcoder preprocess --format instruct`), packed into full rows,
with the loss on the responses only: ours with `train.objective: sft`, the peer on the same rows
(our loader's first batches, in memory) with the prompt labels set to -100. Both attend causally
over the whole packed row (`data.document_mask: false`, which is what the peer computes); a third
row times ours with document masking on. Ours is the whole product path (data loader over the standard-library corpus,
logging, the final checkpoint save inside the timed window); the peer is
`peft.get_peft_model(GPTBigCodeForCausalLM)` on token batches already in memory. The first
`--warmup` steps are not timed; each side runs `--repeats` times, alternating; the best counts.
On a shared machine the loop's numbers swing with the load, so a third part times the models
alone: forward + backward of one micro-batch, ours and the peft model alternating, 12 times each
(min and median).

    PYTHONPATH=. python benchmarks/bench_lora.py [--objective lm|sft] [--steps 25] [--warmup 5]
        [--threads 2] [--repeats 2] [--parts memory,loop,model]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_train_cpu import machine, timed_train

LORA = ["finetune.lora_rank=8", "finetune.lora_alpha=16", "finetune.lora_dropout=0.05",
        "finetune.lora_targets=[q_proj, kv_proj, out_proj, fc_out]"]
# The SFT objective on packed instruction data; document masking is timed on its own row.
SFT = ["train.objective=sft", "data.fim_rate=0", "data.pack=true", "data.document_mask=false"]


def config(corpus: str, base: Path, run: Path, steps: int, lora: bool, extra=()):
    from starcoder.config import load_config

    return load_config("tiny-sc1", [f"data.paths=[{corpus}]", f"train.output_dir={run}",
                                    f"train.init_from={base}", f"train.max_steps={steps}",
                                    "train.lr=1e-4", "train.min_lr=0", "train.warmup_steps=0",
                                    "log.every=10", "log.tensorboard=false", "log.progress_bar=false",
                                    *(LORA if lora else []), *extra])


def instruction_corpus(folder: Path) -> str:
    """The standard library's functions as instruct pairs, tokenised with their loss mask once."""
    from starcoder.data import preprocess_corpus

    prefix = folder / "instruct"
    if not Path(f"{prefix}.idx").is_file():
        pairs = folder / "instructions.jsonl"
        tool = Path(__file__).resolve().parent.parent / "tools" / "stdlib_instructions.py"
        subprocess.run([sys.executable, str(tool), "--output", str(pairs), "--max-files", "200"], check=True)
        preprocess_corpus([pairs], "builtin:tiny", str(prefix), fmt="instruct", workers=1)
    return str(prefix)


def write_base(folder: Path) -> dict[str, Path]:
    """A tiny-sc1 base model drawn from the seed, as a native folder and its HF export."""
    from starcoder.config import load_config
    from starcoder.convert.export import to_hf
    from starcoder.convert.native import write_model_folder
    from starcoder.data.tokenizer import load_tokenizer
    from starcoder.models.gpt import GPT
    from starcoder.models.init import init_weights

    cfg = load_config("tiny-sc1")
    model = GPT(cfg.model)
    init_weights(model, cfg.model, 0)
    vocab = cfg.model.vocab_size
    write_model_folder(folder / "native", cfg, ((n, t[:vocab] if n == "embedding.word.weight" else t)
                                                for n, t in model.state_dict().items()))
    load_tokenizer(cfg.data.tokenizer).save(folder / "native")
    return {"native": folder / "native", "hf": to_hf(folder / "native", folder / "hf")}


def memory(corpus: str, base: Path, workdir: Path, lora: bool, extra=()) -> dict[str, int]:
    """Bytes held for training, measured on the trainer after two steps and a save, in a fresh
    (spawned: a fork of a process with torch threads can hang) child so that its peak RSS, above
    the RSS it started with, is its own."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()  # a Process, not a Pool: its data loader may start worker processes
    child = ctx.Process(target=_memory, args=(queue, corpus, base, workdir, lora, tuple(extra)))
    child.start()
    result = queue.get()
    child.join()
    return result


def _rss_bytes() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory(queue, corpus: str, base: Path, workdir: Path, lora: bool, extra: tuple) -> None:
    import resource

    start_rss = _rss_bytes()
    from starcoder.training.signals import StopRequest
    from starcoder.training.trainer import Trainer

    run = workdir / ("lora" if lora else "full")
    shutil.rmtree(run, ignore_errors=True)
    trainer = Trainer(config(corpus, base, run, 2, lora, extra))
    with StopRequest() as stop:
        trainer.run(stop)
    trainer.close()
    params = list(trainer.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [t for s in trainer.optimizer.state.values() for t in s.values()
             if torch.is_tensor(t) and t.numel() > 1]
    step_dir = next((run / "checkpoints").glob("step_*"))
    queue.put({"parameters": sum(p.numel() for p in params),
               "trainable": sum(p.numel() for p in trainable),
               "weight_bytes": sum(p.numel() * p.element_size() for p in params),
               "grad_bytes": sum(p.numel() * 4 for p in trainable),  # fp32 .grad of each trainable
               "adam_bytes": sum(t.numel() * t.element_size() for t in state),
               "adam_tensors": len(state),
               "checkpoint_bytes": sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file()),
               "peak_rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss})


def ours(corpus: str, base: Path, workdir: Path, steps: int, warmup: int, extra=()) -> float:
    run = workdir / "bench"
    shutil.rmtree(run, ignore_errors=True)
    return timed_train(config(corpus, base, run, steps, lora=True, extra=extra), warmup)


def sft_batches(cfg, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our loader's first `count` micro-batches as (inputs, labels with -100 off the loss)."""
    from starcoder.data import build_train_loader
    from starcoder.data.tokenizer import load_tokenizer

    loader = build_train_loader(cfg, load_tokenizer(cfg.data.tokenizer), dp_rank=0, dp_size=1,
                                consumed_samples=0)
    out = []
    for _ in range(count):
        batch = next(loader)
        labels = batch["tokens"][:, 1:].clone()
        labels[batch["loss_mask"] == 0] = -100
        out.append((batch["tokens"][:, :-1], labels))
    return out


def peer(hf_base: Path, steps: int, warmup: int, sft_cfg=None) -> float:
    """Tokens/s of a plain peft + transformers LoRA loop of the same shape: on random tokens (LM),
    or on our SFT rows with the prompt labels -100 (`sft_cfg`, the run's config)."""
    import peft
    from transformers import AutoModelForCausalLM

    from starcoder.config import load_config

    t = load_config("tiny-sc1").train
    model = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["c_attn", "c_proj"],
        task_type="CAUSAL_LM")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                            weight_decay=t.weight_decay)
    if sft_cfg is None:
        batches = [torch.randint(0, 8192, (t.micro_batch_size, t.seq_length + 1)) for _ in range(8)]
    else:
        rows = sft_batches(sft_cfg, 8)
    start = None
    for step in range(steps):
        if sft_cfg is None:
            tokens = batches[step % len(batches)]
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
        else:  # labels already shifted: the masked mean cross-entropy over the logits
            inputs, labels = rows[step % len(rows)]
            logits = model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 == warmup:
            start = time.perf_counter()
    return (steps - warmup) * t.micro_batch_size * t.seq_length / (time.perf_counter() - start)


def model_steps(cfg_base: dict[str, Path], repeats: int = 12) -> dict[str, list[float]]:
    """Seconds of forward + backward of one 8 x 256 micro-batch, ours and peft's, alternating."""
    import peft
    from transformers import AutoModelForCausalLM

    from starcoder.config import load_config
    from starcoder.convert.weights import load_weights
    from starcoder.finetune.lora import apply_lora
    from starcoder.models.gpt import GPT

    cfg = load_config("tiny-sc1", [*LORA, f"train.init_from={cfg_base['native']}"])
    ours_model = GPT(cfg.model)
    load_weights(ours_model, cfg_base["native"])
    apply_lora(ours_model, cfg).train()
    theirs = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(cfg_base["hf"], dtype=torch.float32,
                                             attn_implementation="sdpa"),
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["c_attn", "c_proj"],
                        task_type="CAUSAL_LM")).train()
    tokens = torch.randint(0, 8192, (8, 257), generator=torch.Generator().manual_seed(0))
    steps = {"ours": lambda: ours_model(tokens[:, :-1], tokens[:, 1:]).mean().backward(),
             "peft": lambda: theirs(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss.backward()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=("lm", "sft"), default="lm",
                        help="lm: the standard-library corpus; sft: instruction pairs, response loss only")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parts", default="memory,loop,model", help="which measurements")
    parser.add_argument("--workdir", default=None, help="corpus, base model and runs (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from starcoder.cli.demo import prepare_corpus

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lora_"))
    if args.objective == "sft":
        corpus, extra = instruction_corpus(workdir / "data"), SFT
    else:
        corpus, extra = prepare_corpus(workdir / "data", max_files=200), []
    base = write_base(workdir / "base")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    print(f"machine: {machine()}; commit {commit}")

    parts = args.parts.split(",")
    if "model" in parts:
        times = model_steps(base)
        print("\ntiny-sc1 + LoRA, forward + backward of one 8 x 256 micro-batch, alternating, 12 each")
        print("| model | min ms | median ms | min vs peft |")
        print("|---|---:|---:|---:|")
        for name, label in (("ours", "ours (`apply_lora`)"), ("peft", "`peft` GPTBigCodeForCausalLM")):
            t = sorted(times[name])
            print(f"| {label} | {1000 * t[0]:.0f} | {1000 * t[len(t) // 2]:.0f} | "
                  f"{min(times['peft']) / t[0]:.2f}x |")
    if "memory" in parts:
        full = memory(corpus, base["native"], workdir, False, extra)
        lora = memory(corpus, base["native"], workdir, True, extra)
        print(f"\ntiny-sc1, fp32, AdamW, objective {args.objective}: full fine-tuning against LoRA "
              "(r 8, Astraios targets)")
        print("| | full fine-tuning | LoRA | LoRA / full |")
        print("|---|---:|---:|---:|")
        for key, label in (("trainable", "trainable parameters"), ("grad_bytes", "gradients (bytes)"),
                           ("adam_bytes", "AdamW state (bytes)"), ("adam_tensors", "AdamW state tensors"),
                           ("weight_bytes", "weights (bytes)"), ("checkpoint_bytes", "checkpoint (bytes)"),
                           ("peak_rss_growth_bytes", "peak RSS growth of the run (bytes)")):
            print(f"| {label} | {full[key]:,} | {lora[key]:,} | {lora[key] / full[key]:.4f} |")
        total = {k: m["weight_bytes"] + m["grad_bytes"] + m["adam_bytes"] for k, m in (("full", full), ("lora", lora))}
        print(f"| weights + gradients + AdamW state (bytes) | {total['full']:,} | {total['lora']:,} | "
              f"{total['lora'] / total['full']:.4f} |")

    if "loop" not in parts:
        return
    sft = args.objective == "sft"
    sft_cfg = config(corpus, base["native"], workdir / "rows", args.steps, True, extra) if sft else None
    results = {"ours": [], "peer": [], **({"ours_docmask": []} if sft else {})}
    for _ in range(args.repeats):
        results["ours"].append(ours(corpus, base["native"], workdir, args.steps, args.warmup, extra))
        results["peer"].append(peer(base["hf"], args.steps, args.warmup, sft_cfg))
        if sft:
            results["ours_docmask"].append(ours(corpus, base["native"], workdir, args.steps, args.warmup,
                                                [*extra, "data.document_mask=true"]))
    best = {k: max(v) for k, v in results.items()}
    print(f"\ntiny-sc1 + LoRA, objective {args.objective}, micro-batch 8 x 256, AdamW, "
          f"{args.threads} threads, {args.steps - args.warmup} timed steps, best of {args.repeats}")
    print("| training loop | tokens/s | ms/step | vs peft |")
    print("|---|---:|---:|---:|")
    rows = [("ours", f"`starcoder train`, {'SFT + ' if sft else ''}LoRA (data, logging, checkpoint)"),
            ("peer", "plain `peft` + `transformers` GPTBigCodeForCausalLM")]
    if sft:
        rows.append(("ours_docmask", "`starcoder train`, SFT + LoRA, `data.document_mask: true`"))
    for name, label in rows:
        print(f"| {label} | {best[name]:,.0f} | {1000 * 8 * 256 / best[name]:.0f} | "
              f"{best[name] / best['peer']:.2f}x |")
    print("all runs (tokens/s): " + ", ".join(f"{k} {[round(x) for x in v]}" for k, v in results.items()))


if __name__ == "__main__":
    main()
