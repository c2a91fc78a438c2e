"""Attention of one new token over the KV cache (flash-decoding), reading only positions [0, pos].

Static shapes for CUDA graphs: the grid is fixed (batch x KV heads x NSPLIT slices of the cache) and the
valid length pos + 1 is read on the device; slices past it exit at once. Each program serves the G = H/KV
query heads that share its KV head (GQA), so each K/V row is read once; the heads are padded to 16 rows so
the scores and the weighted sum run on tensor cores. Pass 1 writes per-slice (max, sum, unnormalised
output); pass 2 combines the slices. With one slice (a cache of <= 128 positions) pass 1
normalises and writes the output itself.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .dequant import cast
from .pdl import pdl_enter, pdl_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attend_slice(q, kbase, vbase, start, end, scale, bh, rmask, split, m_ptr, l_ptr, o_ptr, y_ptr,
                  GP: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr, NSPLIT: tl.constexpr,
                  INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of q (GP, HD) over cache positions [start, end) of one KV head (kbase / vbase: its
    (S, HD) caches); rows bh = b * H + head. NSPLIT == 1: the normalised output into y (B, H * HD); else the
    slice's partials (max, sum, unnormalised output) into m / l (B, H, NSPLIT) and o (B, H, NSPLIT, HD).
    PREC "ieee" for float32 caches (tests, CPU-parity runs): tl.dot would otherwise round to tf32."""
    d = tl.arange(0, HD)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, HD), tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < end
        k = tl.load(kbase + s[:, None] * HD + d[None, :], mask=smask[:, None], other=0.0)  # (BLOCK_S, HD)
        v = tl.load(vbase + s[:, None] * HD + d[None, :], mask=smask[:, None], other=0.0)
        if INTERPRET:  # the interpreter's bf16 dot is wrong (triton 3.9): float32 there
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (GP, BLOCK_S)
        sc = tl.where(smask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    if NSPLIT == 1:  # one slice: normalise here, no combine
        tl.store(y_ptr + bh[:, None] * HD + d[None, :], (acc / l_i[:, None]).to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None])
    else:
        out = bh * NSPLIT + split
        tl.store(m_ptr + out, m_i, mask=rmask)
        tl.store(l_ptr + out, l_i, mask=rmask)
        tl.store(o_ptr + out[:, None] * HD + d[None, :], acc, mask=rmask[:, None])


@triton.jit
def decode_attention_kernel(
    # pointers: q (B, H, HD), caches (B', KV, S, HD), position (1,) int64, partials m/l (B, H, NSPLIT),
    # o (B, H, NSPLIT, HD) float32, y (B, H * HD) (written directly when NSPLIT == 1)
    q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, o_ptr, y_ptr,
    # sizes
    H, KV, S, CHUNK, scale,
    # meta
    G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr, NSPLIT: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr = False, PREC: tl.constexpr = "tf32",
):
    if PDL:  # pdl.py: q and the caches come from earlier kernels
        pdl_enter(PDL)
    bk = tl.program_id(0)  # b * KV + kv head
    split = tl.program_id(1)
    b = bk // KV
    kvh = bk % KV
    length = tl.load(pos_ptr) + 1
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    rows = tl.arange(0, GP)  # query heads of this KV head, padded
    rmask = rows < G
    d = tl.arange(0, HD)
    heads = kvh * G + rows
    q = tl.load(q_ptr + (b * H + heads)[:, None] * HD + d[None, :], mask=rmask[:, None], other=0.0)
    if INTERPRET:  # the interpreter's bf16 dot is wrong (triton 3.9): do it in float32 there
        q = q.to(tl.float32)
    kbase = k_ptr + bk.to(tl.int64) * S * HD
    vbase = v_ptr + bk.to(tl.int64) * S * HD
    _attend_slice(q, kbase, vbase, start, end, scale, b * H + heads, rmask, split, m_ptr, l_ptr, o_ptr, y_ptr,
                  GP, HD, BLOCK_S, NSPLIT, INTERPRET, PREC)


@triton.jit
def _combine(m_ptr, l_ptr, o_ptr, y_ptr, bh, HD: tl.constexpr, NSPLIT: tl.constexpr):
    """Per (b, head) bh: y = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i over the NSPLIT slices."""
    sp = tl.arange(0, NSPLIT)
    d = tl.arange(0, HD)
    m = tl.load(m_ptr + bh * NSPLIT + sp)
    l = tl.load(l_ptr + bh * NSPLIT + sp)
    mx = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)  # empty slices weigh 0
    o = tl.load(o_ptr + (bh * NSPLIT + sp)[:, None] * HD + d[None, :])
    y = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(y_ptr + bh * HD + d, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _combine_heads(m_ptr, l_ptr, o_ptr, y_ptr, bh, rmask, HD: tl.constexpr, NSPLIT: tl.constexpr):
    """_combine for the GP rows bh (GP,) at once (rmask: the real ones), the partials read through L2. One
    load of each partial for all the heads: a loop over the heads would wait on L2 once per head."""
    sp = tl.arange(0, NSPLIT)
    d = tl.arange(0, HD)
    idx = bh[:, None] * NSPLIT + sp[None, :]                                        # (GP, NSPLIT)
    m = tl.load(m_ptr + idx, mask=rmask[:, None], other=float("-inf"), cache_modifier=".cg")
    l = tl.load(l_ptr + idx, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
    o = tl.load(o_ptr + idx[:, :, None] * HD + d[None, None, :], mask=rmask[:, None, None], other=0.0,
                cache_modifier=".cg")                                                # (GP, NSPLIT, HD)
    mx = tl.max(m, axis=1)
    w = tl.where(m > float("-inf"), tl.exp(m - mx[:, None]), 0.0)  # empty slices (and padded heads) weigh 0
    den = tl.sum(l * w, axis=1)
    y = tl.sum(o * w[:, :, None], axis=1) / tl.where(rmask, den, 1.0)[:, None]     # (GP, HD)
    tl.store(y_ptr + bh[:, None] * HD + d[None, :], y.to(y_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def combine_kernel(m_ptr, l_ptr, o_ptr, y_ptr, HD: tl.constexpr, NSPLIT: tl.constexpr, PDL: tl.constexpr = False):
    """Pass 2: one program per (b, head), _combine."""
    if PDL:  # pdl.py: the partials come from the kernel before
        pdl_enter(PDL)
    _combine(m_ptr, l_ptr, o_ptr, y_ptr, tl.program_id(0), HD, NSPLIT)


SLICE = int(os.environ.get("QRUN_ATTN_SLICE", 128))  # cache positions per slice (A/B timing)


def n_splits(max_seq: int) -> int:
    """Slices of the cache: one per SLICE = 128 positions (two 64-position iterations each), up to 64. Few KV
    heads (2 in Qwen2-0.5B) give few programs, and one program walking the cache serially costs ~1.5 us of
    latency per 64 positions; slices past the token's position exit at once."""
    return max(1, min(64, triton.next_power_of_2(triton.cdiv(max_seq, SLICE))))


@torch.library.custom_op("qrun::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """q (B, H, hd) of the token at input_pos (1,) -> (B, H * hd): softmax(q k^T / sqrt(hd)) v over cache
    positions [0, input_pos]. Caches (B', KV, S, hd), B' >= B."""
    b, h, hd = q.shape
    _, kv, s, _ = k_cache.shape
    g = h // kv
    nsplit = n_splits(s)
    chunk = triton.cdiv(triton.cdiv(s, nsplit), 64) * 64
    y = torch.empty(b, h * hd, dtype=q.dtype, device=q.device)
    if nsplit > 1:
        m = torch.empty(b, h, nsplit, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        o = torch.empty(b, h, nsplit, hd, dtype=torch.float32, device=q.device)
    else:  # the kernel normalises and writes y itself
        m = l = o = y
    q = q.contiguous()
    decode_attention_kernel[(b * kv, nsplit)](q, k_cache, v_cache, input_pos, m, l, o, y, h, kv, s, chunk,
                                              1.0 / math.sqrt(hd), G=g, GP=max(16, triton.next_power_of_2(g)),
                                              HD=hd, BLOCK_S=64, NSPLIT=nsplit, INTERPRET=INTERPRET,
                                              num_warps=4, **pdl_kwargs(q),
                                              PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if nsplit > 1:
        combine_kernel[(b * h,)](m, l, o, y, HD=hd, NSPLIT=nsplit, num_warps=1, **pdl_kwargs(q))
    return y


@decode_attention.register_fake
def _(q, k_cache, v_cache, input_pos):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


# ------------------------------------------------------------------ RoPE + cache write + attention + combine

@triton.jit
def rope_attention_kernel(
    # pointers: qkv (B, (H + 2 KV) * HD) of one token, cos/sin (S, HD) float32, position (1,) int64,
    # caches (B', KV, S, HD), counters (B * KV,) int32 (zero between launches), partials m/l (B, H, NSPLIT),
    # o (B, H, NSPLIT, HD) float32, y (B, H * HD)
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, cnt_ptr, m_ptr, l_ptr, o_ptr, y_ptr,
    H, KV, S, CHUNK, scale, stride_qkv_b,
    G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr, NSPLIT: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr = False, PREC: tl.constexpr = "tf32", COMBINE: tl.constexpr = True,
):
    """decode_attention_kernel with rope_cache_kernel in front and combine_kernel behind, one launch instead of
    three (COMBINE False: two, the partials left to combine_kernel). Each program rotates the q of its G heads
    itself (a few hundred FMAs); the program whose slice holds the token's position rotates its k, writes k and
    v into the caches and then reads them back like any other position (a CTA barrier between); no other slice
    reads that position. The combine is done by the last of
    the NSPLIT programs of a (batch, KV head) to finish: each stores its partials, then (barrier, one thread)
    increments the counter with acq_rel at GPU scope, the pattern of CUTLASS's split-K semaphore; the one
    that sees NSPLIT - 1 reads every partial through L2 and resets the counter for the next launch."""
    if PDL:  # pdl.py: qkv and the position come from earlier kernels
        pdl_enter(PDL)
    bk = tl.program_id(0)  # b * KV + kv head
    split = tl.program_id(1)
    b = bk // KV
    kvh = bk % KV
    pos = tl.load(pos_ptr)
    length = pos + 1
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    rows = tl.arange(0, GP)
    rmask = rows < G
    heads = kvh * G + rows
    d = tl.arange(0, HD)
    dr = (d + HD // 2) % HD  # rotate_half's partner of each dimension: x[d + HD/2] for d < HD/2, else x[d - HD/2]
    sgn = tl.where(d < HD // 2, -1.0, 1.0)  # rotate_half(x)[d] = sgn[d] * x[dr[d]]
    c = tl.load(cos_ptr + pos * HD + d)  # (HD,) float32
    s = tl.load(sin_ptr + pos * HD + d)
    dt = y_ptr.dtype.element_ty
    # rotated q (GP, HD), rounded to the activation dtype as the unfused kernel stores it. Whole rows, not two
    # halves: one dot of depth HD (tl.dot needs a depth >= 16, and head_dim 16 has halves of 8).
    qb = qkv_ptr + b * stride_qkv_b + heads[:, None] * HD
    xq = tl.load(qb + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    xr = tl.load(qb + dr[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    q = cast(xq * c[None, :] + sgn[None, :] * xr * s[None, :], dt, INTERPRET)
    kbase = k_ptr + bk.to(tl.int64) * S * HD
    vbase = v_ptr + bk.to(tl.int64) * S * HD
    if (pos >= start) & (pos < start + CHUNK):  # this slice holds the token: write its k (rotated) and v
        kb = qkv_ptr + b * stride_qkv_b + (H + kvh) * HD
        xk = tl.load(kb + d).to(tl.float32)
        xkr = tl.load(kb + dr).to(tl.float32)
        tl.store(kbase + pos * HD + d, cast(xk * c + sgn * xkr * s, kbase.dtype.element_ty, INTERPRET))
        vv = tl.load(kb + KV * HD + d)
        tl.store(vbase + pos * HD + d, vv.to(vbase.dtype.element_ty))
        tl.debug_barrier()  # the loop below reads them back from other threads
    if INTERPRET:  # the interpreter's bf16 dot is wrong (triton 3.9): float32 there
        q = q.to(tl.float32)
    _attend_slice(q, kbase, vbase, start, end, scale, b * H + heads, rmask, split, m_ptr, l_ptr, o_ptr, y_ptr,
                  GP, HD, BLOCK_S, NSPLIT, INTERPRET, PREC)
    if NSPLIT > 1 and COMBINE:
        tl.debug_barrier()  # every thread's partials before the counter's release
        arrived = tl.atomic_add(cnt_ptr + bk, 1, sem="acq_rel", scope="gpu")
        if arrived == NSPLIT - 1:  # the last slice of this KV head: combine its G heads
            tl.atomic_xchg(cnt_ptr + bk, 0, sem="relaxed", scope="gpu")
            _combine_heads(m_ptr, l_ptr, o_ptr, y_ptr, b * H + heads, rmask, HD, NSPLIT)


@torch.library.custom_op("qrun::rope_attention", mutates_args=("k_cache", "v_cache", "counters"))
def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, counters: torch.Tensor,
                   n_heads: int, combine_in_kernel: bool = True) -> torch.Tensor:
    """rope_kv_write + decode_attention in one kernel: qkv (B, 1, (H + 2 KV) * hd) of the token at input_pos
    (1,) -> (B, H * hd); rotated k and v written into k_cache / v_cache (B', KV, S, hd), B' >= B.
    counters: int32 (>= B * KV,) zeros, owned by the caller and left at zero (one per cache).
    combine_in_kernel False: the cache slices are combined by combine_kernel after it (two launches), which
    tells the cost of the in-kernel combine apart from that of the RoPE (QRUN_FUSED_ATTN=2)."""
    b = qkv.shape[0]
    _, kv, s, hd = k_cache.shape
    g = n_heads // kv
    qkv2 = qkv.reshape(b, -1)
    if qkv2.stride(-1) != 1:
        qkv2 = qkv2.contiguous()
    nsplit = n_splits(s)
    chunk = triton.cdiv(triton.cdiv(s, nsplit), 64) * 64
    y = torch.empty(b, n_heads * hd, dtype=qkv.dtype, device=qkv.device)
    if nsplit > 1:
        m = torch.empty(b, n_heads, nsplit, dtype=torch.float32, device=qkv.device)
        l = torch.empty_like(m)
        o = torch.empty(b, n_heads, nsplit, hd, dtype=torch.float32, device=qkv.device)
    else:
        m = l = o = y
    rope_attention_kernel[(b * kv, nsplit)](qkv2, cos, sin, input_pos, k_cache, v_cache, counters, m, l, o, y,
                                            n_heads, kv, s, chunk, 1.0 / math.sqrt(hd), qkv2.stride(0), G=g,
                                            GP=max(16, triton.next_power_of_2(g)), HD=hd, BLOCK_S=64,
                                            NSPLIT=nsplit, INTERPRET=INTERPRET, num_warps=4, **pdl_kwargs(qkv2),
                                            PREC="ieee" if qkv.dtype == torch.float32 else "tf32",
                                            COMBINE=combine_in_kernel)
    if nsplit > 1 and not combine_in_kernel:
        combine_kernel[(b * n_heads,)](m, l, o, y, HD=hd, NSPLIT=nsplit, num_warps=1, **pdl_kwargs(qkv2))
    return y


@rope_attention.register_fake
def _(qkv, cos, sin, input_pos, k_cache, v_cache, counters, n_heads, combine_in_kernel=True):
    return qkv.new_empty(qkv.shape[0], n_heads * k_cache.shape[-1])
