"""The one attention seam every backend plugs into.

Shapes: q [batch, seq, q_heads, head_dim]; k, v [batch, seq, kv_heads, head_dim] with
q_heads % kv_heads == 0 (MQA/GQA without materialising repeated K/V). `window=W` lets query i see
keys j with i - W < j <= i (transformers' convention; flash-attn writes it (W-1, 0)).

Without the Triton kernel, a call that needs a mask (a window shorter than the keys, or causal
attention with fewer queries than keys) runs compiled FlexAttention on CUDA: SDPA with an explicit
mask and GQA would take its math kernel, which holds [heads, s, s] scores. Elsewhere (CPU) masked
SDPA serves it.

`document_ids` [batch, seq] (integer, nondecreasing along each row) packs several documents into
one row: query i then sees key j only within its own document (block-diagonal causal).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from starcoder.config import ConfigError, ModelConfig
from starcoder.models import self_check

log = logging.getLogger(__name__)

# The device type on which `auto` means Triton. The kernel tests point it at the CPU, where the
# kernels run under the Triton interpreter, to exercise the CUDA decisions (and the self-check).
AUTO_DEVICE = "cuda"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              window: int | None = None, scale: float | None = None, dropout_p: float = 0.0,
              backend: str = "torch", document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention; returns [batch, seq, q_heads, head_dim].

    `auto` (kept by `resolve_backend` on CUDA) takes the Triton kernel unless this call has
    dropout, which it cannot do: then SDPA serves the call and the reason is logged once.
    """
    backend = attention_backend(backend, q.device.type, dropout_p)
    if backend == "triton":
        if dropout_p > 0.0:
            raise ValueError("model.kernels: triton attention has no dropout; set "
                             "model.attention_dropout: 0 or model.kernels: auto|torch")
        from starcoder.kernels import flash_attention

        return flash_attention(q, k, v, causal=causal, window=window, scale=scale,
                               document_ids=document_ids)
    if document_ids is not None:
        if q.is_cuda and dropout_p == 0.0:  # Flex has no dropout: with it, the [s, s] mask
            return document_flex_attention(q, k, v, document_ids, causal, window, scale)
        return masked_attention(q, k, v, document_mask(document_ids, causal, window), scale,
                                dropout_p)
    return sdpa_attention(q, k, v, causal, window, scale, dropout_p)


def sdpa_attention(q, k, v, causal=True, window=None, scale=None, dropout_p=0.0):
    """PyTorch attention: SDPA, or for a call that needs a mask, compiled FlexAttention on CUDA
    and SDPA with an explicit mask elsewhere."""
    seq_q, seq_k = q.shape[1], k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    # SDPA's is_causal aligns queries to the first keys; an explicit mask aligns them to the last
    # (decoding with a cache), as the window does.
    if (window is not None and window < seq_k) or (causal and seq_q != seq_k):
        if q.is_cuda:
            if dropout_p > 0.0:
                raise ValueError(WINDOW_DROPOUT.format(window=window, dropout=dropout_p,
                                                       kernels="auto|torch"))
            return windowed_flex_attention(q, k, v, causal, window, scale)
        mask = sliding_window_mask(seq_q, seq_k, window or seq_k, causal, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal and seq_q > 1,
                                             dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def windowed_flex_attention(q, k, v, causal=True, window=None, scale=None):
    """Causal and/or sliding-window attention through FlexAttention with a block mask (queries
    end-aligned, as `sliding_window_mask`): blocks the mask empties are skipped, memory is
    flash-like (q, k, v, the output and a log-sum-exp per query are saved), GQA runs without
    repeating K/V. No dropout. On CUDA it runs compiled, as it must: uncompiled Flex builds the
    whole score matrix."""
    seq_q, seq_k = q.shape[1], k.shape[1]
    attend, build_mask = _flex_functions()
    block_mask = _flex_block_mask(build_mask, seq_q, seq_k, window or seq_k, causal, q.device)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = attend(qt, kt, vt, block_mask=block_mask, scale=scale,
                 enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


@functools.cache
def _flex_functions():
    """flex_attention and create_block_mask, compiled once per process (the block mask compiled
    too: eager it evaluates the mask over all [seq_q, seq_k] pairs, gigabytes at 16K)."""
    from torch.nn.attention import flex_attention as flex

    return torch.compile(flex.flex_attention), torch.compile(flex.create_block_mask)


@functools.lru_cache(maxsize=16)
def _flex_block_mask(build_mask, seq_q: int, seq_k: int, window: int, causal: bool,
                     device: torch.device):
    """The BlockMask of `sliding_window_mask(seq_q, seq_k, window, causal)`, once per shape."""
    offset = seq_k - seq_q

    def allowed(b, h, q_idx, kv_idx):
        i = q_idx + offset
        near = (i - kv_idx) < window
        return near & (kv_idx <= i) if causal else near & ((kv_idx - i) < window)

    return build_mask(allowed, None, None, seq_q, seq_k, device=device)


def document_flex_attention(q, k, v, document_ids, causal=True, window=None, scale=None):
    """Packed-document attention through FlexAttention (CUDA's fallback without the Triton
    kernel): the mask of `document_mask` as a mask_mod over the ids, its BlockMask built per call
    (the ids change with every batch), compiled, so blocks of other documents are skipped and no
    [s, s] tensor exists."""
    seq = q.shape[1]
    attend, build_mask = _flex_functions()
    w = window or seq

    def allowed(b, h, q_idx, kv_idx):
        near = (document_ids[b, q_idx] == document_ids[b, kv_idx]) & ((q_idx - kv_idx) < w)
        return near & (kv_idx <= q_idx) if causal else near & ((kv_idx - q_idx) < w)

    block_mask = build_mask(allowed, document_ids.shape[0], None, seq, seq, device=q.device)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = attend(qt, kt, vt, block_mask=block_mask, scale=scale,
                 enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def masked_attention(q, k, v, mask: torch.Tensor, scale=None, dropout_p: float = 0.0):
    """SDPA with a boolean mask [batch, seq_q, seq_k] (True: may attend), as a KV cache builds it
    for prompts of different lengths and rolling sliding-window buffers, and `document_mask` for
    packed documents."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale,
                                         dropout_p=dropout_p, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def document_mask(document_ids: torch.Tensor, causal: bool = True,
                  window: int | None = None) -> torch.Tensor:
    """Boolean [batch, seq, seq] self-attention mask, True where query i may see key j: the same
    document, and the causal / sliding-window mask of `sliding_window_mask`. (As a FlexAttention
    mask_mod this is `doc[b, i] == doc[b, j]` and'ed with the causal/window one.)"""
    seq = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return same & sliding_window_mask(seq, seq, window or seq, causal, document_ids.device)


@functools.lru_cache(maxsize=16)
def sliding_window_mask(seq_q: int, seq_k: int, window: int, causal: bool,
                        device: torch.device) -> torch.Tensor:
    """Boolean [seq_q, seq_k] mask, True where attention is allowed (queries end-aligned)."""
    i = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    j = torch.arange(seq_k, device=device)[None, :]
    allowed = (i - j) < window
    if causal:
        allowed &= j <= i
    else:
        allowed &= (j - i) < window
    return allowed


WINDOW_DROPOUT = ("model.sliding_window: {window} with model.attention_dropout: {dropout} cannot "
                  "run on CUDA with model.kernels: {kernels} (attention dropout takes the PyTorch "
                  "path, whose windowed attention, FlexAttention, has no dropout); set "
                  "model.attention_dropout: 0 or model.sliding_window: null")


def check_window_dropout(m: ModelConfig, seq_length: int, device_type: str) -> None:
    """Refuse, as a ConfigError naming the keys, a sliding window shorter than the sequence
    together with attention dropout on CUDA when the Triton kernel does not serve the calls
    (`kernels: torch`, or `auto`, which sends calls with dropout to PyTorch): the windowed path
    there is FlexAttention, which has no dropout. (`kernels: triton` has no dropout at all and
    says so per call; CPU's masked SDPA has dropout.)"""
    windowed = m.sliding_window is not None and m.sliding_window < seq_length
    if device_type == "cuda" and windowed and m.attention_dropout > 0 and m.kernels != "triton":
        raise ConfigError(WINDOW_DROPOUT.format(window=m.sliding_window,
                                                dropout=m.attention_dropout, kernels=m.kernels))


def resolve_backend(kernels: str, device: torch.device) -> str:
    """`auto` means Triton on CUDA (when Triton imports), the PyTorch references elsewhere.

    On CUDA `auto` stays `auto`: every op then takes its Triton kernel per call unless that call
    is one the kernel cannot serve (attention dropout), which falls back with a logged reason.
    Code outside the model should test `uses_triton(backend, tensor, kernel)` rather than compare
    names.
    """
    if kernels == "auto":
        return "auto" if device.type == AUTO_DEVICE and _triton_available() else "torch"
    return kernels


def attention_backend(backend: str, device_type: str, dropout_p: float) -> str:
    """The backend that serves one attention call: `auto` resolves per call (and takes PyTorch for
    a kernel that failed its self-check)."""
    if backend != "auto":
        return backend
    if device_type != AUTO_DEVICE or not _triton_available() or \
            not self_check.trusted("flash_attention"):
        return "torch"
    if dropout_p > 0.0:
        _log_once(f"model.kernels: auto uses SDPA for attention while attention dropout is "
                  f"{dropout_p} > 0 (the Triton flash attention has no dropout; it still serves "
                  f"calls without dropout, e.g. evaluation)")
        return "torch"
    return "triton"


def uses_triton(backend: str, x: torch.Tensor, kernel: str | None = None) -> bool:
    """Whether an op with this backend runs its Triton kernel on tensors like `x`. `kernel`: its
    name in `self_check.CHECKS`; `auto` does not use a kernel that failed its self-check."""
    if backend == "triton":
        return True
    return (backend == "auto" and x.device.type == AUTO_DEVICE and _triton_available()
            and (kernel is None or self_check.trusted(kernel)))


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.warning(message)


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("model.kernels: auto found no Triton; using the PyTorch kernels")
        return False
    return True
