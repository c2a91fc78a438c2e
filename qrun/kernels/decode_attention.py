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

from .pdl import gdc_launch_dependents, gdc_wait, pdl_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
        gdc_wait()
        gdc_launch_dependents()
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
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, HD), tl.float32)
    kbase = k_ptr + bk.to(tl.int64) * S * HD
    vbase = v_ptr + bk.to(tl.int64) * S * HD
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < end
        k = tl.load(kbase + s[:, None] * HD + d[None, :], mask=smask[:, None], other=0.0)
        v = tl.load(vbase + s[:, None] * HD + d[None, :], mask=smask[:, None], other=0.0)
        if INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # float32 caches (tests, CPU-parity runs) get exact fp32 dots; tl.dot would otherwise round to tf32
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (GP, BLOCK_S)
        sc = tl.where(smask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    if NSPLIT == 1:  # one slice: normalise here and skip the combine kernel (y_ptr: (B, H * HD))
        y = acc / l_i[:, None]
        tl.store(y_ptr + (b * H + heads)[:, None] * HD + d[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None])
    else:
        out = (b * H + heads) * NSPLIT + split
        tl.store(m_ptr + out, m_i, mask=rmask)
        tl.store(l_ptr + out, l_i, mask=rmask)
        tl.store(o_ptr + out[:, None] * HD + d[None, :], acc, mask=rmask[:, None])


@triton.jit
def combine_kernel(m_ptr, l_ptr, o_ptr, y_ptr, HD: tl.constexpr, NSPLIT: tl.constexpr, PDL: tl.constexpr = False):
    """Per (b, head): y = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i over the NSPLIT slices."""
    bh = tl.program_id(0)
    sp = tl.arange(0, NSPLIT)
    if PDL:  # pdl.py: the partials come from the kernel before
        gdc_wait()
        gdc_launch_dependents()
    d = tl.arange(0, HD)
    m = tl.load(m_ptr + bh * NSPLIT + sp)
    l = tl.load(l_ptr + bh * NSPLIT + sp)
    mx = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)  # empty slices weigh 0
    o = tl.load(o_ptr + (bh * NSPLIT + sp)[:, None] * HD + d[None, :])
    y = tl.sum(o * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(y_ptr + bh * HD + d, y.to(y_ptr.dtype.element_ty))


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
