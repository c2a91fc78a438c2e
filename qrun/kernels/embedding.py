"""Quantized embedding lookup in one kernel: token ids -> their dequantized rows.

Why: in plain torch the lookup is a gather of the packed rows, a gather of their scales (and zeros), and the
unpack, subtract, scale and cast of qrun/quant.py's dequantize_parts: ~6 launches of ~2 us each at the head of
every decode step, where the whole step of Qwen2-0.5B is ~540 us (profile_decode.py --graph, docs/PERF.md
round 9). Here one program per (token, D slice) reads the id, its packed bytes and its scales and writes the
row.

Numerics are those of dequantize_parts exactly: the code (value - offset, an integer, or the NF4 table
entry) times the float32 scale, one float32 product, then one cast to the activation dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dequant import cast, int4_values, int8_values
from .ops import _code_table
from .pdl import pdl_enter, pdl_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENCODINGS = ("int8_sym", "int4_sym", "int4_asym", "nf4")


@triton.jit
def quant_embedding_kernel(
    # ids (T,) int64, packed table (V, Kp/2 or Kp) uint8 / int8, scales (V, NB), zeros (V, NB) or dummy,
    # NF4 table (16,) float32 or dummy, y (T, D)
    ids_ptr, w_ptr, s_ptr, z_ptr, code_ptr, y_ptr,
    D, stride_w, stride_s, stride_z,
    ENC: tl.constexpr, B: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
    INTERPRET: tl.constexpr = False,
):
    """Program (t, j): elements j BLOCK .. (j + 1) BLOCK - 1 of token t's row (BLOCK a power of 2 >= 2; with int4
    the program reads BLOCK / 2 bytes)."""
    t = tl.program_id(0)
    if PDL:  # the id is written by the previous step's argmax
        pdl_enter(PDL)
    row = tl.load(ids_ptr + t).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK
    if ENC == "int8_sym":
        k = k0 + tl.arange(0, BLOCK)
        m = k < D
        v = int8_values(tl.load(w_ptr + row * stride_w + k, mask=m, other=0)) - 128.0       # (BLOCK,)
        s = tl.load(s_ptr + row * stride_s + k // B, mask=m, other=0.0).to(tl.float32)
        out = v * s
    else:
        p = k0 // 2 + tl.arange(0, BLOCK // 2)                                                # packed bytes
        k = tl.reshape(tl.join(2 * p, 2 * p + 1), (BLOCK,))                                  # element of each value
        m = k < D
        q = tl.load(w_ptr + row * stride_w + p, mask=p < (D + 1) // 2, other=0)
        lo, hi = int4_values(q, code_ptr, ENC)                                                 # (BLOCK / 2,) each
        v = tl.reshape(tl.join(lo, hi), (BLOCK,))
        s = tl.load(s_ptr + row * stride_s + k // B, mask=m, other=0.0).to(tl.float32)
        if ENC == "int4_sym":
            v = v - 8.0
        elif ENC == "int4_asym":
            v = v - tl.load(z_ptr + row * stride_z + k // B, mask=m, other=0).to(tl.float32)
        out = v * s
    tl.store(y_ptr + t.to(tl.int64) * D + k, cast(out, y_ptr.dtype.element_ty, INTERPRET), mask=m)


def supported(encoding: str, scales: torch.Tensor) -> bool:
    return encoding in ENCODINGS and scales.dtype in (torch.float16, torch.float32, torch.bfloat16)


@torch.library.custom_op("qrun::quant_embedding", mutates_args=())
def quant_embedding(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    encoding: str, block_size: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """ids (T,) long -> (T, dim) dtype: rows ids of the table (qweight (V, Kp/2 or Kp), scales (V, NB), zeros
    (V, NB) for int4_asym), as dequantize_parts would give them."""
    t = ids.numel()
    y = torch.empty(t, dim, dtype=dtype, device=ids.device)
    if t == 0:
        return y
    block = min(1024, triton.next_power_of_2(max(dim, 2)))  # each element finds its own scale: any BLOCK works
    z = zeros if zeros is not None else scales
    c = _code_table(ids.device) if encoding == "nf4" else scales
    quant_embedding_kernel[(t, triton.cdiv(dim, block))](
        ids, qweight, scales, z, c, y, dim, qweight.stride(0), scales.stride(0), z.stride(0), ENC=encoding,
        B=block_size, BLOCK=block, INTERPRET=INTERPRET, num_warps=4, **pdl_kwargs(ids))
    return y


@quant_embedding.register_fake
def _(ids, qweight, scales, zeros, encoding, block_size, dim, dtype):
    return torch.empty(ids.numel(), dim, dtype=dtype, device=ids.device)
