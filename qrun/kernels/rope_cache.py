"""Decode-time RoPE fused with the KV-cache write: one kernel takes the fused q|k|v projection of one token
and leaves rotated q in a small output, rotated k and plain v in the caches at the token's position.

Rotation is the Hugging Face "rotate half" layout: dim i pairs with dim i + hd/2,
    out[i]        = x[i] cos[i] - x[i + hd/2] sin[i]
    out[i + hd/2] = x[i + hd/2] cos[i] + x[i] sin[i]
with the (max_seq, hd) float32 cos/sin tables indexed by the position, which is read on the device (no host
sync, so the step can live in a CUDA graph).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dequant import cast
from .pdl import pdl_enter, pdl_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def rotate_half(x1, x2, cos_ptr, sin_ptr, pos, d, HD: tl.constexpr):
    """x1, x2 float32 = dims d and d + HD/2 of a head -> both rotated by the (S, HD) float32 tables at pos."""
    c = tl.load(cos_ptr + pos * HD + d)
    s = tl.load(sin_ptr + pos * HD + d)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def rope_cache_kernel(
    # pointers: qkv (B, (H + 2 KV) * HD) of one token, cos/sin (S, HD) float32, position (1,) int64,
    # q_out (B, H, HD), k_cache/v_cache (B, KV, S, HD)
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr,
    # sizes
    H, KV, S, stride_qkv_b,
    # meta
    HD: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # pdl.py: the position and qkv come from earlier kernels
        pdl_enter(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1: q heads, H..H+KV-1: k heads, H+KV..: v heads
    half = tl.arange(0, HD // 2)
    pos = tl.load(pos_ptr)
    base = qkv_ptr + b * stride_qkv_b + head * HD
    x1 = tl.load(base + half).to(tl.float32)
    x2 = tl.load(base + HD // 2 + half).to(tl.float32)
    if head < H + KV:
        o1, o2 = rotate_half(x1, x2, cos_ptr, sin_ptr, pos, half, HD)
        if head < H:
            dst = q_ptr + (b * H + head) * HD
        else:
            dst = k_ptr + ((b * KV + head - H) * S + pos) * HD
        tl.store(dst + half, cast(o1, dst.dtype.element_ty, INTERPRET))
        tl.store(dst + HD // 2 + half, cast(o2, dst.dtype.element_ty, INTERPRET))
    else:
        dst = v_ptr + ((b * KV + head - H - KV) * S + pos) * HD
        tl.store(dst + half, x1.to(dst.dtype.element_ty))
        tl.store(dst + HD // 2 + half, x2.to(dst.dtype.element_ty))


@torch.library.custom_op("qrun::rope_kv_write", mutates_args=("k_cache", "v_cache"))
def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int) -> torch.Tensor:
    """qkv (B, 1, (H + 2 KV) * hd) -> rotated q (B, H, hd); rotated k and v written at input_pos (1,) into
    k_cache / v_cache (B', KV, S, hd), B' >= B."""
    b = qkv.shape[0]
    _, kv, s, hd = k_cache.shape
    qkv2 = qkv.reshape(b, -1)
    if qkv2.stride(-1) != 1:
        qkv2 = qkv2.contiguous()
    q = torch.empty(b, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    rope_cache_kernel[(b, n_heads + 2 * kv)](qkv2, cos, sin, input_pos, q, k_cache, v_cache, n_heads, kv, s,
                                            qkv2.stride(0), HD=hd, INTERPRET=INTERPRET, num_warps=1,
                                            **pdl_kwargs(qkv2))
    return q


@rope_kv_write.register_fake
def _(qkv, cos, sin, input_pos, k_cache, v_cache, n_heads):
    return qkv.new_empty(qkv.shape[0], n_heads, k_cache.shape[-1])
