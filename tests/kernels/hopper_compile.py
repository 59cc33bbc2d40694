"""Compile every Triton kernel for Hopper (sm_90) without a GPU and check its shared memory.

Run as a script in a process WITHOUT TRITON_INTERPRET (Triton reads it when a kernel is
decorated): `python tests/kernels/hopper_compile.py`. One representative specialisation per
kernel and launch configuration (every autotune config at head_dim 128, the largest tiles, plus
head dims 32 and 64 at the first config). Prints one line per compile and exits non-zero if a
compile fails or needs more than the 227 KiB of shared memory a Hopper block may use.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT = 227 * 1024
TARGET = ("cuda", 90, 32)


def _specs():
    """(label, module, kernel name, pointer dtypes, float args, constexprs, options)."""
    import importlib

    # Modules, not the same-named functions `starcoder.kernels` exports.
    fa = importlib.import_module("starcoder.kernels.flash_attention")
    from starcoder.kernels._triton import ROW_TILE_BACKWARD, ROW_TILE_CONFIGS

    attn_ptrs = lambda names, dt: {n: dt for n in names}  # noqa: E731
    specs = []
    for name, kernel, configs, ptrs in [
        ("fwd", "_attn_fwd", fa.FWD_CONFIGS, ["Q", "K", "V", "O"]),
        ("dkdv", "_attn_bwd_dkdv", fa.DKDV_CONFIGS, ["Q", "K", "V", "DO", "DK", "DV"]),
        ("dq", "_attn_bwd_dq", fa.DQ_CONFIGS, ["Q", "K", "V", "DO", "DQ"]),
    ]:
        fp32_ptrs = {"LSE": "*fp32", "DELTA": "*fp32", "DOC": "*i32"}
        # (head_dim, config, causal, windowed, varlen): every config at 128 with both masks, then
        # the other head dims and mask kinds at the first config, documents at the largest tile.
        runs = [(128, c, True, True, False) for c in configs] + [
            (32, configs[0], True, True, False), (64, configs[0], True, True, False),
            (128, configs[0], True, False, False), (128, configs[0], False, False, False)]
        runs.append((128, max(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]),
                     True, False, True))
        runs = [(d, c, causal, windowed, varlen, "*bf16")
                for d, c, causal, windowed, varlen in runs]
        runs.append((128, fa.FP32_CONFIGS[name], True, True, False, "*fp32"))
        for head_dim, c, causal, windowed, varlen, dtype in runs:
            mask = "causal" if causal else "full"
            mask += "+window" if windowed else ""
            mask += "+documents" if varlen else ""
            specs.append((f"attention {name} {dtype[1:]} d={head_dim} {mask} {c.kwargs} "
                          f"w={c.num_warps} s={c.num_stages}", "starcoder.kernels.flash_attention",
                          kernel, {**attn_ptrs(ptrs, dtype), **fp32_ptrs}, {"qk_scale", "scale"},
                          dict(c.kwargs, HEAD_DIM=head_dim, CAUSAL=causal, WINDOWED=windowed,
                               VARLEN=varlen),
                          dict(num_warps=c.num_warps, num_stages=c.num_stages)))
    specs.append(("attention delta d=128", "starcoder.kernels.flash_attention", "_bwd_delta",
                  {"O": "*bf16", "DO": "*bf16", "DELTA": "*fp32"}, set(),
                  dict(HEAD_DIM=128, BLOCK_M=fa.DELTA_BLOCK_M), dict(num_warps=4)))
    # LayerNorm at the 15B hidden size (6144 -> one 8192-wide row per program).
    ln_ptrs = {"X": "*bf16", "R": "*bf16", "H": "*bf16", "Y": "*bf16", "W": "*fp32",
               "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32"}
    specs.append(("layer_norm fwd n=6144 residual", "starcoder.kernels.layer_norm", "_ln_fwd",
                  ln_ptrs, {"eps"}, dict(HAS_RESIDUAL=True, BLOCK_N=8192), dict(num_warps=16)))
    specs.append(("layer_norm bwd n=6144", "starcoder.kernels.layer_norm", "_ln_bwd",
                  {"DY": "*bf16", "X": "*bf16", "W": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                   "DH": "*bf16", "DX": "*bf16", "DW_PART": "*fp32", "DB_PART": "*fp32"}, set(),
                  dict(HAS_DH=True, BLOCK_N=8192), dict(num_warps=16)))
    gelu_ptrs = {"X": "*bf16", "BIAS": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16",
                 "DB_PART": "*fp32"}
    for c in ROW_TILE_CONFIGS:
        specs.append((f"bias_gelu fwd {c.kwargs} w={c.num_warps}", "starcoder.kernels.bias_gelu",
                      "_bias_gelu_fwd", gelu_ptrs, set(), dict(c.kwargs), dict(num_warps=c.num_warps)))
    bwd = dict(ROW_TILE_BACKWARD)
    warps = bwd.pop("num_warps")
    specs.append((f"bias_gelu bwd {bwd} w={warps}", "starcoder.kernels.bias_gelu", "_bias_gelu_bwd",
                  gelu_ptrs, set(), bwd, dict(num_warps=warps)))
    bda_ptrs = {"X": "*bf16", "BIAS": "*bf16", "R": "*bf16", "Y": "*bf16", "SEED": "*i64",
                "DY": "*bf16", "DX": "*bf16", "DB_PART": "*fp32"}
    # Its tiles are bias-GeLU's, which are all compiled above: the first one and the backward.
    for c in ROW_TILE_CONFIGS[:1]:
        specs.append((f"bias_dropout_add fwd {c.kwargs} w={c.num_warps}",
                      "starcoder.kernels.bias_dropout_add", "_bda_fwd", bda_ptrs, {"p", "scale"},
                      dict(c.kwargs, DROPOUT=True), dict(num_warps=c.num_warps)))
    bwd = dict(ROW_TILE_BACKWARD)
    warps = bwd.pop("num_warps")
    specs.append((f"bias_dropout_add bwd {bwd} w={warps}", "starcoder.kernels.bias_dropout_add",
                  "_bda_bwd", bda_ptrs, {"p", "scale"}, dict(bwd, DROPOUT=True),
                  dict(num_warps=warps)))
    rope_ptrs = {"Q": "*bf16", "K": "*bf16", "QO": "*bf16", "KO": "*bf16", "COS": "*fp32",
                 "SIN": "*fp32"}
    for backward in (False, True):  # StarCoder2-15B: 48 query heads, 4 KV heads, head_dim 128
        specs.append((f"rope {'bwd' if backward else 'fwd'} hq=48 hk=4 d=128", "starcoder.kernels.rope",
                      "_rope_kernel", rope_ptrs, set(),
                      dict(HALF=64, BLOCK_HQ=64, BLOCK_HK=4, BACKWARD=backward), dict(num_warps=8)))
    ce_ptrs = {"LOGITS": "*bf16", "LABELS": "*i64", "MAX": "*fp32", "SUMEXP": "*fp32",
               "TARGET": "*fp32", "LSE": "*fp32", "GRAD": "*fp32", "DLOGITS": "*bf16"}
    specs.append(("cross_entropy stats V=49152", "starcoder.kernels.cross_entropy", "_ce_stats",
                  ce_ptrs, set(), dict(BLOCK_V=8192), dict(num_warps=8)))
    specs.append(("cross_entropy bwd V=49152", "starcoder.kernels.cross_entropy", "_ce_backward",
                  ce_ptrs, set(), dict(BLOCK_V=8192), dict(num_warps=8)))
    return specs


def compile_one(spec):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, module, kernel, ptrs, floats, constexprs, options = spec
    fn = getattr(importlib.import_module(module), kernel)
    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name in ptrs:
            signature[p.name] = ptrs[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # as a launch with aligned tensors specialises
        else:
            signature[p.name] = "fp32" if p.name in floats else "i32"
            if p.name.startswith("stride"):  # model strides are multiples of 16 elements
                attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget(*TARGET), options=options)
    except Exception as exc:  # report every failure, not just the first
        return label, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:400]
    return label, compiled.metadata.shared, time.perf_counter() - start, None


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("hopper_compile: unset TRITON_INTERPRET (kernels would be interpreted, not compiled)")
        return 2
    specs = _specs()
    workers = int(os.environ.get("HOPPER_COMPILE_WORKERS", min(4, os.cpu_count() or 1)))
    start, failures = time.perf_counter(), 0
    with ProcessPoolExecutor(workers) as pool:
        for label, shared, seconds, error in pool.map(compile_one, specs):
            if error is not None:
                failures += 1
                print(f"FAIL  {label}: {error}")
            elif shared > SHARED_LIMIT:
                failures += 1
                print(f"FAIL  {label}: shared {shared} B > {SHARED_LIMIT} B")
            else:
                print(f"ok    {label}: shared {shared} B ({shared / 1024:.1f} KiB), {seconds:.1f} s")
    print(f"{len(specs)} kernels compiled for sm_90 in {time.perf_counter() - start:.0f} s, "
          f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
