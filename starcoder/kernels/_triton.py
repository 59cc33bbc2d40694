"""What the kernel files share: interpreter detection, launch helpers and small checks.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is read once here at import too:
under the interpreter (CPU tests) kernels launch with small fixed blocks instead of autotuning.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Compiled kernels autotune over a few tiles per shape; STARCODER_AUTOTUNE=0 pins the first tile
# instead (the compiled test run uses it: many small shapes, each would otherwise tune).
AUTOTUNE = not INTERPRET and os.environ.get("STARCODER_AUTOTUNE", "1") != "0"

# fp32 tests under the interpreter and on GPUs; the interpreter computes bf16 `tl.dot` wrongly,
# so bf16 is only checked compiled.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected fp16, bf16 or fp32, got {t.dtype}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides for the outer dims but need unit stride along the last one."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] without a copy where possible (kernels take the row stride)."""
    t = last_dim_contiguous(t)
    return t.reshape(-1, t.shape[-1])


def multiprocessors(device: torch.device) -> int:
    """Programs for persistent-style grids: SMs on a GPU, a handful under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


# Row-tiled elementwise kernels (bias-GeLU, bias-dropout-add): (BLOCK_R, BLOCK_C, num_warps) of
# 8K-element tiles, 16-byte accesses along rows.
ROW_TILE_CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w)
                    for r, c, w in [(16, 512, 8), (32, 256, 8), (64, 128, 8), (8, 1024, 4)]]
ROW_TILE_INTERPRETER_BLOCKS = (16, 32)
# The bias-gradient partials' row count depends on BLOCK_R, so the backward keeps one tile shape.
ROW_TILE_BACKWARD = dict(BLOCK_R=32, BLOCK_C=256, num_warps=8)


def row_tile_grid(rows: int, n: int):
    """Launch grid of a row-tiled kernel over a [rows, n] tensor."""
    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(n, meta["BLOCK_C"])
    return grid


def row_tile_options(backward: bool) -> dict:
    """Fixed tile options of a row-tiled kernel (without autotuning, and always for backward)."""
    if INTERPRET:
        return dict(zip(("BLOCK_R", "BLOCK_C"), ROW_TILE_INTERPRETER_BLOCKS))
    if backward:
        return dict(ROW_TILE_BACKWARD)
    config = ROW_TILE_CONFIGS[0]
    return dict(config.kwargs, num_warps=config.num_warps)
