"""Skinny/prefill GEMM (M >= 2): y (M, N) = x (M, K) @ dequant(W)^T, W dequantized tile by tile in registers.

SWAP (default): the product is computed transposed, acc (BLOCK_N, BLOCK_M) = W_tile (BLOCK_N, BLOCK_K) @
x^T (BLOCK_K, BLOCK_M): the dequantized weight is the A operand, which Hopper's wgmma may take from
registers, and x^T is the B operand loaded into shared memory by the pipeliner. Small M (decode batches)
then only pads the MMA's N side to 16. SWAP=False computes x @ W_tile^T (W through shared memory); the
launcher times both for large M.

BLOCK_K divides the quantization block B, so a K tile has one scale (and zero) per row: w = value * s + c
with c = -offset * s, one FMA per weight before the cast to the activation dtype.
SPLIT_K > 1 (small grids only) accumulates fp32 partial sums with atomics into a zeroed fp32 y.
LAY: the weight layout (layout.py), read through the same tiles with different address arithmetic: 0 "rows",
1 "il4" (int4 rows interleaved by 4 every 4 bytes: 4-byte runs along K), 2 "tc16" (tiles of 16 rows, 2-byte runs
along K). Each is an offset of the row plus an offset of the byte column.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import cast, int4_values, int8_values


@triton.jit
def _gemm_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows, rmask, offs_m, mmask, K, KP, stride_xm,
               stride_wn, stride_sn, stride_zn,
               ENC: tl.constexpr, B: tl.constexpr, SPLIT_K: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
               LAY: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 (BLOCK_N, BLOCK_M) = W[rows] @ x[offs_m]^T over this program's share of K."""
    BKB: tl.constexpr = BLOCK_K if ENC == "int8_sym" else BLOCK_K // 2  # packed bytes per K tile
    offs_kb = tl.arange(0, BKB)
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if LAY == 1:  # element [n, c] of an (N, C) part lives at [n // 4, c // e, n % 4, c % e] (e = 4 bytes, 1 scale)
        wrow = (rows // 4) * (4 * stride_wn) + (rows % 4) * 4                    # (BLOCK_N,)
        srow = (rows // 4) * (4 * stride_sn) + (rows % 4)
        zrow = (rows // 4) * (4 * stride_zn) + (rows % 4)
    elif LAY == 2:  # byte [n, p] at [n // 16, p // 32, (p % 8) // 2, n % 8, (p % 32) // 8, (n % 16) // 8, p % 2]
        wrow = (rows // 16) * (16 * stride_wn) + (rows % 8) * 16 + ((rows % 16) // 8) * 2
        srow = (rows // 16) * (16 * stride_sn) + (rows % 16)                   # scales [n // 16, g, n % 16]
        zrow = (rows // 16) * (16 * stride_zn) + (rows % 16)
    else:
        wrow = rows * stride_wn
        srow = rows * stride_sn
        zrow = rows * stride_zn
    for kt in range(tl.program_id(2), tl.cdiv(KP, BLOCK_K), SPLIT_K):
        k0 = kt * BLOCK_K
        # KP is a multiple of B, and B of BLOCK_K: no mask along K for the weight.
        kb = k0 // (BLOCK_K // BKB) + offs_kb                                   # (BKB,) byte column
        if LAY == 1:
            kb = (kb // 4) * 16 + kb % 4
        elif LAY == 2:
            kb = (kb // 32) * 512 + ((kb % 8) // 2) * 128 + ((kb % 32) // 8) * 4 + kb % 2
        q = tl.load(w_ptr + wrow[:, None] + kb[None, :], mask=rmask[:, None], other=0)  # (BLOCK_N, BKB)
        g = k0 // B
        if LAY == 1:
            g = g * 4
        elif LAY == 2:
            g = g * 16
        s = tl.load(s_ptr + srow + g, mask=rmask, other=0.0).to(tl.float32)  # (BLOCK_N,)
        if ENC == "int4_asym":
            c = -tl.load(z_ptr + zrow + g, mask=rmask, other=0).to(tl.float32) * s
        elif ENC == "int4_sym":
            c = -8.0 * s
        elif ENC == "int8_sym":
            c = -128.0 * s
        else:
            c = 0.0 * s
        if ENC == "int8_sym":
            w = int8_values(q) * s[:, None] + c[:, None]                      # (BLOCK_N, BLOCK_K)
        else:
            lo, hi = int4_values(q, code_ptr, ENC)                             # (BLOCK_N, BKB) each
            lo = lo * s[:, None] + c[:, None]
            hi = hi * s[:, None] + c[:, None]
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        kk = k0 + offs_k
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                     mask=mmask[None, :] & (kk < K)[:, None], other=0.0)      # (BLOCK_K, BLOCK_M)
        w = cast(w, xt.dtype, INTERPRET)
        if INTERPRET:  # the CPU interpreter's bf16/fp16 tl.dot is wrong (triton 3.9): same roundings, fp32 dot
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        if SWAP:
            acc = tl.dot(w, xt, acc, input_precision="ieee" if INTERPRET else None)           # (BN, BM)
        else:
            acc = tl.dot(tl.trans(xt), tl.trans(w), acc, input_precision="ieee" if INTERPRET else None)
    if not SWAP:
        acc = tl.trans(acc)                                                                 # (BN, BM)
    return acc


@triton.jit
def gemm_kernel(
    # pointers: x (M, K), packed W (N, KP/2 or KP), scales (N, NB), zeros or dummy, NF4 table or dummy,
    # bias (N_OUT,) or dummy, y (M, N_OUT) (fp32 and zeroed when SPLIT_K > 1)
    x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, bias_ptr, y_ptr,
    # sizes and strides (elements)
    M, N_OUT, K, KP, stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    # meta
    ENC: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr = True,
    LAY: tl.constexpr = 0, INTERPRET: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N_OUT
    mmask = offs_m < M
    acc = _gemm_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows, rmask, offs_m, mmask, K, KP, stride_xm,
                     stride_wn, stride_sn, stride_zn, ENC, B, SPLIT_K, BLOCK_N, BLOCK_M, BLOCK_K, SWAP, LAY,
                     INTERPRET)
    if SILU:  # the launcher never combines SILU with SPLIT_K > 1 (silu is not additive)
        up = _gemm_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows + N_OUT, rmask, offs_m, mmask, K, KP,
                        stride_xm, stride_wn, stride_sn, stride_zn, ENC, B, SPLIT_K, BLOCK_N, BLOCK_M,
                        BLOCK_K, SWAP, LAY, INTERPRET)
        acc = acc / (1.0 + tl.exp(-acc)) * up
    if HAS_BIAS:
        if tl.program_id(2) == 0:
            acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    yp = y_ptr + offs_m[None, :] * stride_ym + rows[:, None]                  # (BLOCK_N, BLOCK_M), y^T
    ymask = rmask[:, None] & mmask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(yp, acc, mask=ymask)
    else:
        tl.store(yp, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)
