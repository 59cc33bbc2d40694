"""Kernel microbenchmarks: the Triton kernels side by side with their peers, in one run.

    python benchmarks/kernels.py [--smoke] [--quick] [--out DIR]
                                 [--only attention,layer_norm,bias_gelu,bias_dropout_add,rope,
                                         cross_entropy]

On a GPU (bf16): attention against every scaled_dot_product_attention backend (flash, cuDNN,
efficient, math with an explicit mask), FlexAttention; LayerNorm, bias-GeLU, bias-dropout-add,
RoPE and cross-entropy against PyTorch eager, torch.compile and Liger-Kernel. Whatever is not installed or
does not support a case is listed with the reason instead of a number. Throughput is TFLOP/s
(attention, counting only the work a causal / windowed mask leaves: half for causal) or GB/s
(the others, each input read once and each output written once), and a fraction of the peak
measured at the start of the run (a large device-to-device copy, a large bf16 matmul).
Attention rows also give `err`, the relative error of the output against the first SDPA backend
that ran (or the fp32 reference in smoke mode).

Without a GPU it runs a tiny smoke version on the CPU (kernels under the Triton interpreter), so
the script itself can be checked anywhere; those numbers mean nothing.

`--quick` (what benchmarks/gpu_check.sh uses to fit its time) runs FlexAttention and masked math
SDPA, which compile or allocate a lot, only on the two target cases (causal MHA 8K, window + GQA
8K). Each section's table is printed and written to DIR (default ./gpu_out) as soon as it is done:
attention.md + attention.png, kernels.md + kernels.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must be decided before any kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import starcoder.kernels as K  # noqa: E402
from starcoder.models.ops import rotary_tables  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


# ------------------------------------------------------------------------------------------------
# Timing and the two ceilings


def bench_ms(fn, smoke: bool) -> float:
    """Median milliseconds per call (CUDA events through do_bench; a host clock on CPU)."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_peaks(smoke: bool) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, measured here and now."""
    n = (1 << 20) if smoke else (1 << 30)  # bytes per buffer
    src = torch.randn(n // 2, device=DEVICE).to(torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), smoke)
    size = 256 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    mm_ms = bench_ms(lambda: a @ b, smoke)
    return {"copy_gbs": 2 * n / copy_ms / 1e6, "matmul_tflops": 2 * size**3 / mm_ms / 1e9}


# ------------------------------------------------------------------------------------------------
# Tables and plots


class Report:
    """Markdown tables, printed and (re)written to DIR/<section>.md after every table."""

    def __init__(self, out: Path, section: str, header: str):
        self.path = out / f"{section}.md"
        self.parts = [header]
        self.rows: list[dict] = []  # for the plot

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        lines = [f"### {title}", "", "| " + " | ".join(columns) + " |",
                 "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        self.parts.append(text)
        self.path.write_text("\n".join(self.parts))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def plot(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> None:
    """Grouped bars: one group per case, one bar per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no matplotlib: {path.name} not drawn)")
        return
    impls = sorted({name for bars in groups.values() for name in bars},
                   key=lambda n: (not n.startswith("triton"), n))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups) * max(1, len(impls)) / 3), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [bars.get(impl, 0.0) for bars in groups.values()], width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Attention


def attention_pairs(seq: int, causal: bool, window: int | None) -> int:
    """(query, key) pairs the mask leaves, i.e. the work actually done."""
    if not causal:
        return seq * seq
    if window is None or window >= seq:
        return seq * (seq + 1) // 2
    return window * (window + 1) // 2 + (seq - window) * window


def _sdpa_mask(seq, causal, window):
    i = torch.arange(seq, device=DEVICE)[:, None]
    j = torch.arange(seq, device=DEVICE)[None, :]
    mask = (j <= i) if causal else torch.ones(seq, seq, dtype=torch.bool, device=DEVICE)
    if window is not None:
        mask &= (i - j) < window
    return mask


def attention_impls(case, q, k, v, quick):
    """name -> (fn(q, k, v) -> out [b, s, h, d]) or a string saying why it is not run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq, causal, window = case["seq"], True, case["window"]
    gqa = q.shape[2] != k.shape[2]
    impls = {"triton (ours)": lambda q, k, v: K.flash_attention(q, k, v, causal=causal, window=window)}

    def sdpa(backend, masked):
        def run(q, k, v):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            kwargs = dict(attn_mask=_sdpa_mask(seq, causal, window)) if masked else dict(is_causal=causal)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa, **kwargs).transpose(1, 2)
        return run

    backends = [("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)]
    for name, backend in backends:
        if not CUDA:
            impls[name] = "CUDA only"
        elif window is not None and backend == SDPBackend.FLASH_ATTENTION:
            impls[name] = "no sliding-window mask"
        else:
            impls[name + (" (mask)" if window is not None else "")] = sdpa(backend, window is not None)
    heavy = not quick or case.get("target", False)
    scores_gb = case["batch"] * q.shape[2] * seq * seq * 4 * 3 / 1e9  # scores, probs, grads (fp32)
    free_gb = torch.cuda.mem_get_info()[0] / 1e9 if CUDA else 8.0
    if not heavy:
        impls["sdpa math (mask)"] = impls["flex attention"] = "skipped by --quick"
        return impls
    impls["sdpa math (mask)"] = (sdpa(SDPBackend.MATH, True) if scores_gb < 0.6 * free_gb
                                 else f"needs ~{scores_gb:.0f} GB for the scores")
    impls["flex attention"] = _flex(case, gqa) if CUDA else "compiled GPU kernel; skipped in smoke mode"
    return impls


def _flex(case, gqa):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return f"not available ({exc})"
    window = case["window"]

    def mask_mod(b, h, i, j):
        allowed = j <= i
        return allowed & (i - j < window) if window is not None else allowed

    block_mask = create_block_mask(mask_mod, None, None, case["seq"], case["seq"], device=DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=gqa).transpose(1, 2)
    return run


def bench_attention(out: Path, smoke: bool, quick: bool, peaks: dict) -> None:
    dtype = torch.float32 if smoke else torch.bfloat16
    d = 32 if smoke else 128
    if smoke:
        cases = [dict(name="causal s=80", batch=1, seq=80, hq=2, hk=2, window=None),
                 dict(name="window 24 + GQA s=80", batch=1, seq=80, hq=4, hk=2, window=24)]
    else:
        cases = [dict(name="causal MHA 8K", batch=2, seq=8192, hq=16, hk=16, window=None, target=True),
                 dict(name="causal MQA 8K (1B)", batch=2, seq=8192, hq=16, hk=1, window=None),
                 dict(name="window 4096 + GQA 8K (SC2)", batch=1, seq=8192, hq=32, hk=4, window=4096,
                      target=True),
                 dict(name="causal MHA 16K", batch=1, seq=16384, hq=16, hk=16, window=None)]
    report = Report(out, "attention", f"## Attention ({dtype}, head_dim {d}) on "
                    f"{torch.cuda.get_device_name() if CUDA else 'CPU (smoke: interpreter)'}\n\n"
                    f"Measured peaks: bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s, copy "
                    f"{peaks['copy_gbs']:.0f} GB/s. Ratio = other time / ours (>1: ours faster).\n")
    groups = {}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for case in cases:
        shape_q = (case["batch"], case["seq"], case["hq"], d)
        shape_kv = (case["batch"], case["seq"], case["hk"], d)
        q, k, v = (torch.randn(s, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
                   for s in (shape_q, shape_kv, shape_kv))
        do = torch.randn(shape_q, device=DEVICE, dtype=dtype, generator=g)
        fwd_flops = 4 * case["batch"] * case["hq"] * d * attention_pairs(case["seq"], True, case["window"])
        rows, results, reference = [], {}, None
        if smoke:
            reference = K.attention_reference(q, k, v, window=case["window"]).float()
        for name, impl in attention_impls(case, q, k, v, quick).items():
            if isinstance(impl, str):
                results[name] = impl
                continue
            try:
                with torch.no_grad():
                    out_ = impl(q, k, v)
                fwd = bench_ms(lambda: impl(q, k, v), smoke)
                both = bench_ms(lambda: torch.autograd.grad(impl(q, k, v), (q, k, v), do), smoke)
            except Exception as exc:  # an unsupported combination: report it, keep going
                results[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                torch.cuda.empty_cache() if CUDA else None
                continue
            if reference is None and name.startswith("sdpa"):
                reference = out_.float()
            results[name] = (fwd, both, out_)
        ours = results.get("triton (ours)")
        groups[case["name"]] = {}
        for name, res in results.items():
            if isinstance(res, str):
                rows.append([name, "-", "-", "-", "-", "-", "-", res])
                continue
            fwd, both, out_ = res
            err = ((out_.float() - reference).norm() / reference.norm()).item() if reference is not None else float("nan")
            tflops_f, tflops_b = fwd_flops / fwd / 1e9, 3.5 * fwd_flops / both / 1e9
            ratio = both / ours[1] if isinstance(ours, tuple) else float("nan")
            rows.append([name, fwd, tflops_f, both, tflops_b,
                         f"{tflops_b / peaks['matmul_tflops']:.0%}", ratio, f"err {err:.1e}"])
            groups[case["name"]][name] = tflops_b
        report.table(f"{case['name']}: batch {case['batch']}, heads {case['hq']}/{case['hk']}, "
                     f"window {case['window']}",
                     ["impl", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
                      "of matmul peak", "ratio (fwd+bwd)", "note"], rows)
        del q, k, v, do, results, reference
        if CUDA:
            torch.cuda.empty_cache()
    plot(out / "attention.png", "attention fwd+bwd TFLOP/s", groups, "TFLOP/s")


# ------------------------------------------------------------------------------------------------
# Memory-bound kernels and cross-entropy


def _liger(name):
    try:
        import liger_kernel.transformers as liger  # noqa: F401
    except ImportError:
        return None, "liger-kernel not installed"
    return __import__("liger_kernel.transformers", fromlist=[name]), None


def _compiled(fn, smoke):
    if smoke:
        return "skipped in smoke mode (C++ compile on CPU is slow)"
    return torch.compile(fn, dynamic=False)


def pointwise_cases(smoke: bool, dtype):
    """(kernel, label, make_inputs, impls, bytes_fwd, bytes_bwd)."""
    tokens = 64 if smoke else 16384
    hidden = 64 if smoke else 2048
    ffn = 128 if smoke else 8192
    g = torch.Generator(device=DEVICE).manual_seed(1)
    rnd = lambda *s, grad=True: torch.randn(*s, device=DEVICE, dtype=dtype, generator=g).requires_grad_(grad)  # noqa: E731
    e = torch.finfo(dtype).bits // 8
    cases = []

    # LayerNorm
    x, w, b = rnd(tokens, hidden), rnd(hidden), rnd(hidden)
    ref = lambda x, w, b: F.layer_norm(x, (hidden,), w, b, 1e-5)  # noqa: E731
    impls = {"triton (ours)": lambda x, w, b: K.layer_norm(x, w, b, 1e-5), "torch eager": ref,
             "torch.compile": _compiled(ref, smoke)}
    mod, why = _liger("LigerLayerNorm")
    if mod is None:
        impls["liger"] = why
    else:
        ln = mod.LigerLayerNorm(hidden, eps=1e-5, bias=True).to(DEVICE, dtype)
        impls["liger"] = lambda x, w, b: ln(x)
    cases.append(("layer_norm", f"{tokens}x{hidden}", (x, w, b), impls,
                  2 * tokens * hidden * e, 3 * tokens * hidden * e))

    # bias + GeLU-tanh
    x, b = rnd(tokens, ffn), rnd(ffn)
    ref = lambda x, b: F.gelu(x + b, approximate="tanh")  # noqa: E731
    impls = {"triton (ours)": K.bias_gelu, "torch eager": ref, "torch.compile": _compiled(ref, smoke),
             "liger": "no bias-GeLU kernel (only gated GeGLU)"}
    cases.append(("bias_gelu", f"{tokens}x{ffn}", (x, b), impls,
                  2 * tokens * ffn * e, 3 * tokens * ffn * e))

    # bias + dropout (p 0.1) + residual add, as after out_proj / fc_out in training
    x, b, r = rnd(tokens, hidden), rnd(hidden), rnd(tokens, hidden)
    seed = K.draw_seed(DEVICE)
    ref = lambda x, b, r: r + F.dropout(x + b, 0.1, training=True)  # noqa: E731
    impls = {"triton (ours)": lambda x, b, r: K.bias_dropout_add(x, b, r, 0.1, seed),
             "torch eager": ref, "torch.compile": _compiled(ref, smoke),
             "liger": "no bias-dropout-add kernel"}
    # fwd: read x and the residual, write the sum; bwd: read dy, write dx (d residual is dy).
    cases.append(("bias_dropout_add", f"{tokens}x{hidden} p=0.1", (x, b, r), impls,
                  3 * tokens * hidden * e, 2 * tokens * hidden * e))

    # RoPE (StarCoder2-like heads)
    seq, hq, hk, d = (16, 4, 2, 32) if smoke else (8192, 32, 4, 128)
    batch = max(1, tokens // seq)
    q, k = rnd(batch, seq, hq, d), rnd(batch, seq, hk, d)
    cos, sin = rotary_tables(seq, d, 10000.0, DEVICE)
    impls = {"triton (ours)": lambda q, k: K.apply_rope(q, k, cos, sin),
             "torch eager": lambda q, k: K.rope_reference(q, k, cos, sin),
             "torch.compile": _compiled(lambda q, k: K.rope_reference(q, k, cos, sin), smoke)}
    mod, why = _liger("liger_rotary_pos_emb")
    if mod is None:
        impls["liger"] = why
    else:
        c, s = cos[None].to(dtype), sin[None].to(dtype)

        def liger_rope(q, k):  # Liger takes [b, h, s, d]
            qo, ko = mod.liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c, s)
            return qo.transpose(1, 2), ko.transpose(1, 2)
        impls["liger"] = liger_rope
    rope_bytes = 2 * (q.numel() + k.numel()) * e
    cases.append(("rope", f"{batch}x{seq}x({hq}+{hk})x{d}", (q, k), impls, rope_bytes, rope_bytes))
    return cases


def _run(impl, inputs):
    out = impl(*inputs)
    return out if isinstance(out, tuple) else (out,)


def bench_pointwise(report: Report, smoke: bool, peaks: dict, dtype, groups, only) -> None:
    for kernel, label, inputs, impls, bytes_f, bytes_b in pointwise_cases(smoke, dtype):
        if kernel not in only:
            continue
        rows = []
        ours = None
        for name, impl in impls.items():
            if isinstance(impl, str):
                rows.append([name, "-", "-", "-", "-", "-", "-", impl])
                continue
            try:
                outs = _run(impl, inputs)
                grads = [torch.randn_like(o) for o in outs]
                fwd = bench_ms(lambda: _run(impl, inputs), smoke)
                # The backward alone, replayed on one retained graph.
                bwd = bench_ms(lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True,
                                                           allow_unused=True), smoke)
            except Exception as exc:
                rows.append([name, "-", "-", "-", "-", "-", "-",
                             f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"])
                continue
            gbs_f, gbs_b = bytes_f / fwd / 1e6, bytes_b / bwd / 1e6
            ours = ours or (fwd + bwd)
            rows.append([name, fwd, gbs_f, f"{gbs_f / peaks['copy_gbs']:.0%}", bwd, gbs_b,
                         f"{gbs_b / peaks['copy_gbs']:.0%}", f"ratio {(fwd + bwd) / ours:.2f}"])
            groups.setdefault(f"{kernel} fwd", {})[name] = gbs_f / peaks["copy_gbs"] * 100
            groups.setdefault(f"{kernel} bwd", {})[name] = gbs_b / peaks["copy_gbs"] * 100
        report.table(f"{kernel} ({label}, {dtype})",
                     ["impl", "fwd ms", "fwd GB/s", "of copy", "bwd ms", "bwd GB/s", "of copy",
                      "note (fwd+bwd time / ours)"], rows)
        del inputs, impls


def bench_cross_entropy(report: Report, smoke: bool, peaks: dict, dtype, groups) -> None:
    tokens, hidden, vocab = (64, 32, 300) if smoke else (16384, 2048, 49152)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE, generator=g)
    e = torch.finfo(dtype).bits // 8

    def eager(logits):
        return F.cross_entropy(logits.float(), labels, reduction="none")

    impls = {
        "triton (ours)": lambda logits: K.cross_entropy(logits, labels),
        "triton (ours, inplace bwd)": lambda logits: K.cross_entropy(logits, labels, inplace_backward=True),
        "torch eager (fp32 upcast)": eager,
        "torch.compile": _compiled(eager, smoke),
    }
    mod, why = _liger("LigerCrossEntropyLoss")
    if mod is None:
        impls["liger"] = why
    else:
        liger_ce = mod.LigerCrossEntropyLoss(reduction="sum")
        impls["liger"] = lambda logits: liger_ce(logits, labels)
    # One logits leaf per implementation, allocated before the peak is measured. The in-place
    # variants overwrite it with gradients; the repeated runs then read those (random, finite).
    rows = []
    for name, impl in impls.items():
        if isinstance(impl, str):
            rows.append([name, "-", "-", "-", "-", impl])
            continue
        logits = torch.randn(tokens, vocab, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
        try:
            ms, peak = _loss_step(lambda: impl(logits), smoke, inputs=(logits,))
        except Exception as exc:
            rows.append([name, "-", "-", "-", "-", f"failed: {type(exc).__name__}: {str(exc)[:80]}"])
            continue
        finally:
            del logits
        gbs = 3 * tokens * vocab * e / ms / 1e6  # read (fwd), read + write (bwd)
        rows.append([name, ms, gbs, f"{gbs / peaks['copy_gbs']:.0%}", peak, ""])
        groups.setdefault("cross_entropy peak MB", {})[name] = peak
    report.table(f"cross_entropy ({tokens} tokens x vocab {vocab}, {dtype}); peak = extra memory "
                 "of fwd+bwd beyond the logits", ["impl", "fwd+bwd ms", "GB/s", "of copy",
                                                  "peak MB", "note"], rows)

    # Fused linear + cross-entropy: hidden [tokens, h] @ weight[vocab, h].T
    hid = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(vocab, hidden, device=DEVICE, dtype=dtype, generator=g) * 0.02).requires_grad_()
    impls = {"triton (ours, chunked)": lambda: K.linear_cross_entropy(hid, weight, labels),
             "torch eager (matmul + fp32 CE)": lambda: eager(hid @ weight.t())}
    mod, why = _liger("LigerFusedLinearCrossEntropyLoss")
    if mod is None:
        impls["liger fused linear CE"] = why
    else:
        lce = mod.LigerFusedLinearCrossEntropyLoss(reduction="sum")
        impls["liger fused linear CE"] = lambda: lce(weight, hid, labels)
    rows = []
    flops = 6 * tokens * hidden * vocab
    for name, impl in impls.items():
        if isinstance(impl, str):
            rows.append([name, "-", "-", "-", impl])
            continue
        try:
            ms, peak = _loss_step(impl, smoke, inputs=(hid, weight))
        except Exception as exc:
            rows.append([name, "-", "-", "-", f"failed: {type(exc).__name__}: {str(exc)[:80]}"])
            continue
        rows.append([name, ms, flops / ms / 1e9, peak, ""])
        groups.setdefault("linear+CE peak MB", {})[name] = peak
    report.table(f"linear + cross_entropy ({tokens} x {hidden} @ {vocab} x {hidden}, {dtype}); peak "
                 "= extra memory of fwd+bwd", ["impl", "fwd+bwd ms", "TFLOP/s (3 matmuls)",
                                               "peak MB", "note"], rows)


def _loss_step(make_loss, smoke, inputs=None):
    """(ms per fwd+bwd, peak MB allocated beyond what existed before) of loss.sum().backward()."""
    def step():
        loss = make_loss()
        loss.sum().backward()
        if inputs:
            for t in inputs:
                t.grad = None
    step()
    peak = float("nan")
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return bench_ms(step, smoke), peak


# ------------------------------------------------------------------------------------------------


SECTIONS = ("attention", "layer_norm", "bias_gelu", "bias_dropout_add", "rope", "cross_entropy")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the default without a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="FlexAttention and masked math SDPA on the two target cases only")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_out"),
                        help="folder for the tables and plots (default: $OUT or ./gpu_out)")
    args = parser.parse_args(argv)
    smoke = args.smoke or not CUDA
    only = set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peaks = measure_peaks(smoke)
    print(f"device {torch.cuda.get_device_name() if CUDA else 'cpu (smoke, Triton interpreter)'}; "
          f"torch {torch.__version__}; measured copy {peaks['copy_gbs']:.0f} GB/s, matmul "
          f"{peaks['matmul_tflops']:.1f} TFLOP/s", flush=True)
    if "attention" in only:
        bench_attention(out, smoke, args.quick, peaks)
    rest = only - {"attention"}
    if rest:
        dtype = torch.float32 if smoke else torch.bfloat16
        report = Report(out, "kernels", f"## Memory-bound kernels and cross-entropy on "
                        f"{torch.cuda.get_device_name() if CUDA else 'CPU (smoke)'}\n\nMeasured copy "
                        f"bandwidth {peaks['copy_gbs']:.0f} GB/s (read + write).\n")
        groups: dict = {}
        if rest & {"layer_norm", "bias_gelu", "bias_dropout_add", "rope"}:
            bench_pointwise(report, smoke, peaks, dtype, groups, rest)
        if "cross_entropy" in rest:
            bench_cross_entropy(report, smoke, peaks, dtype, groups)
        pct = {k: v for k, v in groups.items() if "MB" not in k}
        plot(out / "kernels.png", "memory-bound kernels: % of measured copy bandwidth", pct, "% of copy")
        mem = {k: v for k, v in groups.items() if "MB" in k}
        if mem:
            plot(out / "memory.png", "loss peak memory (MB beyond inputs)", mem, "MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
