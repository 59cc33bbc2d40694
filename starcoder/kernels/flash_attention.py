"""Flash attention, forward and backward, for causal / sliding-window / GQA self-attention,
optionally restricted to documents (varlen attention over packed sequences).

q [batch, seq, q_heads, head_dim]; k, v [batch, seq, kv_heads, head_dim], q_heads a multiple of
kv_heads. Query i sees key j when j <= i (causal) and i - W < j (window W, transformers'
convention); without `causal` a window is two-sided, |i - j| < W, as the model's mask is.

Documents: `document_ids` [batch, seq] (integer, nondecreasing along each row; each value is one
document, i.e. each run of equal ids) adds "i and j lie in the same document" to the mask, so
several examples packed into one row attend as if each ran alone (block-diagonal causal).
flash-attn's varlen API takes cu_seqlens (cumulative document lengths over a flattened batch)
instead; per-token ids say the same thing (cu_seqlens are the indices where the id changes, plus
the ends) but keep the [batch, seq] layout every other part of the model and the tensor-parallel
collectives use, need no host-side sequence bookkeeping, and let a row hold any number of
documents without changing a kernel argument. Internally the ids become a table of, per token,
its document's index in the row and the [start, end) of that document. Because ids are
nondecreasing, the tiles whose query and key blocks share a document are exactly those that
overlap [start of the first query's document, end of the last query's document) (per-block
min/max ids whose ranges do not overlap share no document): the loops never visit the others,
tiles inside one document run unmasked, and only tiles straddling a boundary mask elements.

FlashAttention-2 scheme: each program owns a block of queries, streams key blocks through an
online softmax in fp32 and stores the output and the row log-sum-exp. The backward recomputes
probabilities from that log-sum-exp: one kernel per key block accumulates dK and dV over every
query head of its KV group (so repeated K/V is never materialised and no atomics are needed),
another per query block accumulates dQ. Key/query ranges are split into masked edge blocks and
unmasked interior blocks, so masks cost only where the causal diagonal, the window edge or the
sequence end cut through a tile.

`attention_reference` is the plain PyTorch definition the kernels are tested against (with
`document_ids`: the block-diagonal causal mask, built explicitly).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from starcoder.kernels._triton import (AUTOTUNE, INTERPRET, check_dtype, last_dim_contiguous,
                                       multiprocessors)

LOG2E = 1.4426950408889634


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        window: int | None = None, scale: float | None = None,
                        document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention in fp32 with an explicit mask; K/V heads repeated for GQA.
    `document_ids` [batch, seq]: query i sees key j only if both carry the same id."""
    seq, group = q.shape[1], q.shape[2] // k.shape[2]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    i = torch.arange(seq, device=q.device)[:, None]
    j = torch.arange(seq, device=q.device)[None, :]
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (i - j < window) & (causal | (j - i < window))
    if document_ids is not None:  # [batch, 1 (heads), seq, seq]
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).to(q.dtype)


# ------------------------------------------------------------------------------------------------
# Which blocks a tile must visit, and which of them need no mask.


@triton.jit
def _key_range(start_m, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Key blocks for queries [start_m, start_m + BLOCK_M): [lo, hi) with [ulo, uhi) mask-free."""
    end_m = start_m + BLOCK_M
    if CAUSAL:
        hi = tl.minimum(end_m, seq_len)
        uhi = tl.minimum((start_m + 1) // BLOCK_N, seq_len // BLOCK_N) * BLOCK_N
    else:
        hi = seq_len
        uhi = seq_len // BLOCK_N * BLOCK_N
    lo = 0
    ulo = 0
    if WINDOWED:
        lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N
        ulo = tl.cdiv(tl.maximum(end_m - window, 0), BLOCK_N) * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum(hi, end_m - 1 + window)
            uhi = tl.minimum(uhi, (start_m + window) // BLOCK_N * BLOCK_N)
    ulo = tl.minimum(tl.maximum(ulo, lo), hi)
    uhi = tl.minimum(tl.maximum(uhi, ulo), hi)
    return lo, ulo, uhi, hi


@triton.jit
def _query_range(start_n, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Query blocks that see keys [start_n, start_n + BLOCK_N): [lo, hi), mask-free [ulo, uhi)."""
    end_n = start_n + BLOCK_N
    lo = 0
    ulo = 0
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        ulo = tl.cdiv(end_n - 1, BLOCK_M) * BLOCK_M
    hi = seq_len
    uhi = seq_len // BLOCK_M * BLOCK_M
    if WINDOWED:
        hi = tl.minimum(hi, end_n - 1 + window)
        uhi = tl.minimum(uhi, (start_n + window) // BLOCK_M * BLOCK_M)
        if not CAUSAL:
            lo = tl.maximum(start_n - window + 1, 0) // BLOCK_M * BLOCK_M
            ulo = tl.cdiv(tl.maximum(end_n - window, 0), BLOCK_M) * BLOCK_M
    ulo = tl.minimum(tl.maximum(ulo, lo), hi)
    uhi = tl.minimum(tl.maximum(uhi, ulo), hi)
    return lo, ulo, uhi, hi


@triton.jit
def _allowed(i, j, seq_len, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Query positions i may attend to key positions j (broadcast against each other)."""
    ok = (i < seq_len) & (j < seq_len)
    if CAUSAL:
        ok = ok & (j <= i)
    if WINDOWED:
        ok = ok & (i - j < window)
        if not CAUSAL:
            ok = ok & (j - i < window)
    return ok


@triton.jit
def _document_range(lo, ulo, uhi, hi, doc_base, stride_dt, first, last, BLOCK: tl.constexpr):
    """Tighten a block's range [lo, hi) (mask-free [ulo, uhi)) to its documents.

    The block holds positions first..last (queries or keys); the range runs over the other side.
    Only positions in [start of first's document, end of last's document) share a document with
    the block; a tile is mask-free only inside [start of last's document, end of first's), which
    is empty unless the block lies in one document."""
    starts = doc_base + stride_dt
    ends = doc_base + 2 * stride_dt
    lo = tl.maximum(lo, tl.load(starts + first) // BLOCK * BLOCK)
    hi = tl.minimum(hi, tl.load(ends + last))
    ulo = tl.minimum(tl.maximum(ulo, tl.cdiv(tl.load(starts + last), BLOCK) * BLOCK), hi)
    uhi = tl.minimum(tl.maximum(tl.minimum(uhi, tl.load(ends + first) // BLOCK * BLOCK), ulo), hi)
    return lo, ulo, uhi, hi


# ------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, doc_m,
                doc_base, lo, hi, seq_len, window, qk_scale, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                VARLEN: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < seq_len, other=0.0)
        else:
            k = tl.load(k_ptrs)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
        if MASKED:
            ok = _allowed(offs_m[:, None], cols[None, :], seq_len, window, CAUSAL, WINDOWED)
            if VARLEN:
                doc_n = tl.load(doc_base + cols, mask=cols < seq_len, other=-1)
                ok = ok & (doc_m[:, None] == doc_n[None, :])
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row whose keys so far are all masked keeps m = -inf; subtract 0 instead of -inf.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=cols[:, None] < seq_len, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, DOC,
              stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
              stride_dt, stride_db, seq_len, q_heads, group, window, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, VARLEN: tl.constexpr):
    # DOC (VARLEN only): int32 [3, batch, seq], per token its document's index in the row and
    # that document's [start, end); unused otherwise.
    # Causal: the last query blocks do the most work, so launch them first.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // q_heads).to(tl.int64)
    h = bh % q_heads
    kv_h = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_len, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, ulo, uhi, hi = _key_range(start_m, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    doc_base = DOC + b * stride_db
    doc_m = offs_m  # a placeholder without VARLEN (never read)
    if VARLEN:
        lo, ulo, uhi, hi = _document_range(lo, ulo, uhi, hi, doc_base, stride_dt, start_m,
                                           tl.minimum(start_m + BLOCK_M, seq_len) - 1, BLOCK_N)
        doc_m = tl.load(doc_base + offs_m, mask=offs_m < seq_len, other=-2)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m,
                                offs_d, doc_m, doc_base, lo, ulo, seq_len, window, qk_scale,
                                BLOCK_N, True, CAUSAL, WINDOWED, VARLEN)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m,
                                offs_d, doc_m, doc_base, ulo, uhi, seq_len, window, qk_scale,
                                BLOCK_N, False, CAUSAL, WINDOWED, VARLEN)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m,
                                offs_d, doc_m, doc_base, uhi, hi, seq_len, window, qk_scale,
                                BLOCK_N, True, CAUSAL, WINDOWED, VARLEN)
    # Rows past the sequence end can see no key (l = 0); they are never stored.
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < seq_len)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural-log units
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, lse, mask=offs_m < seq_len)


# ------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
               seq_len, heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax gradient."""
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < seq_len
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=rows, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                 offs_n, offs_d, doc_n, doc_base, lo, hi, seq_len, window, qk_scale,
                 BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 WINDOWED: tl.constexpr, VARLEN: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dos + offs_d[None, :]
        if MASKED:
            rows = offs_m < seq_len
            q = tl.load(q_ptrs, mask=rows[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=rows, other=0.0)
        else:
            q = tl.load(q_ptrs)
            lse = tl.load(lse_base + offs_m)
        # Work transposed ([keys, queries]) so dK and dV come out of plain dots.
        qk_t = tl.dot(k, tl.trans(q)) * qk_scale
        p_t = tl.math.exp2(qk_t - lse[None, :] * 1.4426950408889634)
        if MASKED:
            ok = _allowed(offs_m[None, :], offs_n[:, None], seq_len, window, CAUSAL, WINDOWED)
            if VARLEN:
                doc_m = tl.load(doc_base + offs_m, mask=rows, other=-1)
                ok = ok & (doc_n[:, None] == doc_m[None, :])
            p_t = tl.where(ok, p_t, 0.0)
            do = tl.load(do_ptrs, mask=rows[:, None], other=0.0)
            delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        else:
            do = tl.load(do_ptrs)
            delta = tl.load(delta_base + offs_m)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, DOC,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                   stride_dk_split, stride_dkb, stride_dks, stride_dkh, stride_dt, stride_db,
                   seq_len, q_heads, kv_heads, group, heads_per_program, window, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, VARLEN: tl.constexpr):
    # Axis 2 splits a KV head's query heads over programs (MQA/GQA): each split writes its own
    # fp32 partial dK/dV (stride_dk_split apart), summed afterwards.
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    split = tl.program_id(2)
    b = (bkv // kv_heads).to(tl.int64)
    kv_h = bkv % kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n[:, None] < seq_len
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=cols, other=0.0)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=cols, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, ulo, uhi, hi = _query_range(start_n, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    doc_base = DOC + b * stride_db
    doc_n = offs_n  # a placeholder without VARLEN (never read)
    if VARLEN:
        lo, ulo, uhi, hi = _document_range(lo, ulo, uhi, hi, doc_base, stride_dt, start_n,
                                           tl.minimum(start_n + BLOCK_N, seq_len) - 1, BLOCK_M)
        doc_n = tl.load(doc_base + offs_n, mask=offs_n < seq_len, other=-2)
    for g in range(split * heads_per_program, (split + 1) * heads_per_program):
        h = kv_h * group + g  # a query head that shares this KV head
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row = (b * q_heads + h) * seq_len
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qs,
                              stride_dos, offs_n, offs_d, doc_n, doc_base, lo, ulo, seq_len, window,
                              qk_scale, BLOCK_M, True, CAUSAL, WINDOWED, VARLEN)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qs,
                              stride_dos, offs_n, offs_d, doc_n, doc_base, ulo, uhi, seq_len, window,
                              qk_scale, BLOCK_M, False, CAUSAL, WINDOWED, VARLEN)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qs,
                              stride_dos, offs_n, offs_d, doc_n, doc_base, uhi, hi, seq_len, window,
                              qk_scale, BLOCK_M, True, CAUSAL, WINDOWED, VARLEN)
    out = (split.to(tl.int64) * stride_dk_split + b * stride_dkb + kv_h * stride_dkh
           + offs_n[:, None] * stride_dks + offs_d[None, :])
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=cols)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=cols)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
               doc_m, doc_base, lo, hi, seq_len, window, qk_scale, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
               VARLEN: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < seq_len, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < seq_len, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            ok = _allowed(offs_m[:, None], cols[None, :], seq_len, window, CAUSAL, WINDOWED)
            if VARLEN:
                doc_n = tl.load(doc_base + cols, mask=cols < seq_len, other=-1)
                ok = ok & (doc_m[:, None] == doc_n[None, :])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, DOC,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                 stride_dqb, stride_dqs, stride_dqh, stride_dt, stride_db,
                 seq_len, q_heads, group, window, qk_scale, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, VARLEN: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // q_heads).to(tl.int64)
    h = bh % q_heads
    kv_h = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=rows[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=rows[:, None], other=0.0)
    row = bh.to(tl.int64) * seq_len
    lse = tl.load(LSE + row + offs_m, mask=rows, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=rows, other=0.0)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, ulo, uhi, hi = _key_range(start_m, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    doc_base = DOC + b * stride_db
    doc_m = offs_m  # a placeholder without VARLEN (never read)
    if VARLEN:
        lo, ulo, uhi, hi = _document_range(lo, ulo, uhi, hi, doc_base, stride_dt, start_m,
                                           tl.minimum(start_m + BLOCK_M, seq_len) - 1, BLOCK_N)
        doc_m = tl.load(doc_base + offs_m, mask=rows, other=-2)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                    doc_m, doc_base, lo, ulo, seq_len, window, qk_scale, BLOCK_N, True, CAUSAL,
                    WINDOWED, VARLEN)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                    doc_m, doc_base, ulo, uhi, seq_len, window, qk_scale, BLOCK_N, False, CAUSAL,
                    WINDOWED, VARLEN)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                    doc_m, doc_base, uhi, hi, seq_len, window, qk_scale, BLOCK_N, True, CAUSAL,
                    WINDOWED, VARLEN)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])


# ------------------------------------------------------------------------------------------------
# Launch configurations. Compiled: autotuned per (sequence length, head dim, mask kind) over a few
# Hopper-sized tiles. Interpreted: small fixed tiles (tests change them to cover more boundaries).

def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)])
DKDV_CONFIGS = _configs([(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3)])
DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)])
# fp32 inputs (tests; compiled fp32 dots run as TF32) need twice the shared memory per tile:
# one small fixed tile per kernel, not tuned.
FP32_CONFIGS = {"fwd": _configs([(64, 32, 4, 2)])[0], "dkdv": _configs([(32, 64, 4, 2)])[0],
                "dq": _configs([(64, 32, 4, 2)])[0]}
DELTA_BLOCK_M = 64
# Tiles the interpreter uses: (BLOCK_M, BLOCK_N) per kernel.
INTERPRETER_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}

_TUNE_KEY = ["seq_len", "HEAD_DIM", "CAUSAL", "WINDOWED", "VARLEN"]
_KERNELS = {"fwd": (_attn_fwd, FWD_CONFIGS), "dkdv": (_attn_bwd_dkdv, DKDV_CONFIGS),
            "dq": (_attn_bwd_dq, DQ_CONFIGS)}
_TUNED = {name: triton.autotune(configs, key=_TUNE_KEY)(kernel)
          for name, (kernel, configs) in _KERNELS.items()} if AUTOTUNE else {}


def _launch(name: str, grid, fp32: bool, *args, **constexprs):
    """Autotuned when compiled; else a fixed tile (the interpreter's, fp32's, or the first)."""
    kernel, configs = _KERNELS[name]
    if INTERPRET:
        block_m, block_n = INTERPRETER_BLOCKS[name]
        kernel[grid](*args, **constexprs, BLOCK_M=block_m, BLOCK_N=block_n)
    elif name in _TUNED and not fp32:
        _TUNED[name][grid](*args, **constexprs)
    else:
        config = FP32_CONFIGS[name] if fp32 else configs[0]
        kernel[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                     num_stages=config.num_stages)


def _group_splits(group: int, programs: int, device: torch.device) -> int:
    """Over how many programs to spread a KV head's query heads in the dK/dV kernel.

    MQA/GQA leave few (KV head, key block) programs, each looping over the whole group, and
    causal masks make the first key blocks the longest: split the group until there are about
    two programs per multiprocessor (a divisor of the group, so every split is the same size).
    """
    target = 2 * multiprocessors(device)
    for splits in range(1, group + 1):
        if group % splits == 0 and programs * splits >= target:
            return splits
    return group


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def document_table(document_ids: torch.Tensor) -> torch.Tensor:
    """int32 [3, batch, seq] from document ids [batch, seq]: per token, its document's index in
    the row (0, 1, ...), and the first and one-past-last position of that document.

    A document is a run of equal ids (with nondecreasing ids, one per distinct value)."""
    batch, seq = document_ids.shape
    new = torch.ones(batch, seq, dtype=torch.bool, device=document_ids.device)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    pos = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    index = new.cumsum(1) - 1
    starts = torch.where(new, pos, 0).cummax(1).values
    ends = torch.where(last, pos + 1, seq).flip(1).cummin(1).values.flip(1)
    return torch.stack((index, starts, ends)).to(torch.int32)


def _document_args(documents: Optional[torch.Tensor], fallback: torch.Tensor):
    """(table pointer, its two strides) for a launch; without documents any tensor stands in
    (VARLEN is off, the kernel never reads it)."""
    if documents is None:
        return fallback, 0, 0
    return documents, documents.stride(0), documents.stride(1)


# ------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, so the graph does not break around them)


@torch.library.custom_op("starcoder::flash_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                documents: Optional[torch.Tensor], causal: bool, window: Optional[int],
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, q_heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, q_heads, seq, dtype=torch.float32, device=q.device)

    def grid(meta):
        return triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads

    doc, stride_dt, stride_db = _document_args(documents, lse)
    _launch("fwd", grid, q.dtype == torch.float32, q, k, v, out, lse, doc, *_strides(q),
            *_strides(k), *_strides(v), *_strides(out), stride_dt, stride_db, seq, q_heads,
            q_heads // k.shape[2], window or 0, scale * LOG2E, HEAD_DIM=head_dim, CAUSAL=causal,
            WINDOWED=window is not None, VARLEN=documents is not None)
    return out, lse


@_forward_op.register_fake
def _(q, k, v, documents, causal, window, scale):
    batch, seq, q_heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(batch, q_heads, seq, dtype=torch.float32))


@torch.library.custom_op("starcoder::flash_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, documents: Optional[torch.Tensor],
                 causal: bool, window: Optional[int],
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grad_out = last_dim_contiguous(grad_out)
    delta = torch.empty_like(lse)
    _bwd_delta[(triton.cdiv(seq, DELTA_BLOCK_M), batch * q_heads)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), seq, q_heads,
        HEAD_DIM=head_dim, BLOCK_M=DELTA_BLOCK_M)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    group = q_heads // kv_heads
    splits = _group_splits(group, triton.cdiv(seq, 128) * batch * kv_heads, q.device)
    if splits == 1:
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    else:
        dk = torch.empty((splits, *k.shape), dtype=torch.float32, device=k.device)
        dv = torch.empty_like(dk)
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, WINDOWED=window is not None,
                  VARLEN=documents is not None)
    doc, stride_dt, stride_db = _document_args(documents, lse)
    qkv_strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))

    def dkdv_grid(meta):
        return triton.cdiv(seq, meta["BLOCK_N"]), batch * kv_heads, splits

    def dq_grid(meta):
        return triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads

    split_stride = dk.stride(0) if splits > 1 else 0
    dk_strides = _strides(dk[0] if splits > 1 else dk)
    _launch("dkdv", dkdv_grid, q.dtype == torch.float32, q, k, v, grad_out, dk, dv, lse, delta,
            doc, *qkv_strides, split_stride, *dk_strides, stride_dt, stride_db, seq, q_heads,
            kv_heads, group, group // splits, window or 0, scale * LOG2E, scale, **common)
    if splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    _launch("dq", dq_grid, q.dtype == torch.float32, q, k, v, grad_out, dq, lse, delta, doc,
            *qkv_strides, *_strides(dq), stride_dt, stride_db, seq, q_heads, q_heads // kv_heads,
            window or 0, scale * LOG2E, scale, **common)
    return dq, dk, dv


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, documents, causal, window, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, documents, causal, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, documents)
    ctx.causal, ctx.window, ctx.scale = causal, window, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, documents = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, documents, ctx.causal, ctx.window,
                              ctx.scale)
    return dq, dk, dv, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    window: int | None = None, scale: float | None = None,
                    document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output [batch, seq, q_heads, head_dim] (see the module docstring);
    `document_ids` [batch, seq] (integer, nondecreasing per row) keeps attention within documents."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"flash_attention: expected q [b, s, hq, d] and k, v [b, s, hk, d], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, seq, q_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
        raise ValueError(f"flash_attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                         "(self-attention: same batch, sequence and head_dim)")
    if q_heads % k.shape[2]:
        raise ValueError(f"flash_attention: {q_heads} query heads are not a multiple of "
                         f"{k.shape[2]} KV heads")
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"flash_attention: head_dim {head_dim} unsupported (16, 32, 64, 128, 256)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if window is not None:
        if window < 1:
            raise ValueError(f"flash_attention: window must be >= 1, got {window}")
        if window >= seq:
            window = None  # the window covers the whole sequence: no window mask needed
    documents = None
    if document_ids is not None:
        if document_ids.shape != (batch, seq) or document_ids.is_floating_point():
            raise ValueError(f"flash_attention: document_ids must be integer [batch, seq] = "
                             f"{(batch, seq)}, got {document_ids.dtype} {tuple(document_ids.shape)}")
        documents = document_table(document_ids)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out, _ = _forward_op(q, k, v, documents, causal, window, scale)
    return out
