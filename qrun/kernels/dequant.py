"""The one dequantization step shared by the GEMV and the GEMM kernels.

Packed bytes in the canonical qrun/quant.py layout -> float32 codes, BEFORE the block scale and zero are
applied (the callers fold scale and zero in where it is cheapest: per block in the GEMV, per row of a tile
in the GEMM). For every encoding the code is `value - offset`:

    int8_sym   value = q + 128 in [0, 255]       offset 128
    int4_sym   value = nibble ^ 8 in [0, 15]     offset 8     (two's complement nibble q = value - 8)
    int4_asym  value = nibble in [0, 15]         offset z     (the stored zero point)
    nf4        value = NF4_CODE[nibble]          offset 0

Integers become floats through the exponent trick, float(0x4B000000 | u) - 2**23 = u for u < 2**23: an
integer op and a full-rate FADD instead of I2F, which runs at a quarter of the FMA rate on Hopper and would
otherwise cap a bandwidth-bound GEMV.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAGIC = 0x4B000000  # bit pattern of 2**23 as float32
MAGIC_F = 8388608.0


@triton.jit
def u_to_f32(u):
    """int32 tensor with values in [0, 2**23) -> the same values as float32 (exact)."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def int4_values(q, code_ptr, ENC: tl.constexpr):
    """q: uint8 tensor of packed bytes (...) -> (lo, hi) float32 values of elements 2j (low nibble) and
    2j+1 (high nibble), each shaped like q. See the module docstring for the value of each encoding."""
    q32 = q.to(tl.int32)  # zero-extends the uint8
    if ENC == "int4_sym":
        q32 = q32 ^ 0x88  # flip both sign bits: two's complement nibble n -> n + 8 in [0, 15]
    lo = q32 & 0xF
    hi = (q32 >> 4) & 0xF
    if ENC == "nf4":
        # 16-entry float32 table, L1-resident after the first touch.
        flo = tl.load(code_ptr + lo)
        fhi = tl.load(code_ptr + hi)
    else:
        flo = u_to_f32(lo)
        fhi = u_to_f32(hi)
    return flo, fhi


@triton.jit
def int8_values(q):
    """q: int8 tensor -> float32 q + 128 (exact)."""
    return u_to_f32(q.to(tl.int32) + 128)


@triton.jit
def cast(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """v.to(dtype), rounding to nearest even. The CPU interpreter (triton 3.9) truncates float32 -> bf16
    casts, which doubles the rounding error the tests see; there the rounding is done by hand first."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # round the low 16 bits away, ties to even
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)
