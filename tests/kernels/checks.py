"""Shared pieces of the kernel tests: the device, dtypes per mode, and the error measure.

On a CPU machine the suite runs under TRITON_INTERPRET=1 (fp32 and fp16: the interpreter computes
bf16 `tl.dot` wrongly); on a GPU the same tests run compiled, bf16 included. Errors are relative
Frobenius norms against an fp32 reference computed from the same (rounded) inputs.
"""

from __future__ import annotations

import torch

from starcoder.kernels._triton import INTERPRET

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])

# Relative error allowed per dtype: interpreted fp32 is exact fp32 arithmetic; compiled fp32 dots
# default to TF32 (~3e-4); fp16/bf16 round operands (2^-11 / 2^-8) and, in attention, the
# probabilities before the P @ V product.
TOLERANCE = {
    torch.float32: 1e-5 if INTERPRET else 2e-3,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}
# Elementwise kernels do no dots: fp32 is exact fp32 on GPUs as well.
ELEMENTWISE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (an unwritten output reads as NaN here)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.1e}"


def randn(*shape, dtype, generator, scale=1.0, requires_grad=True):
    t = (torch.randn(*shape, generator=generator) * scale).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_(requires_grad)


def upcast(*tensors):
    """fp32 leaf copies of the (already rounded) inputs, for the reference."""
    return [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]
