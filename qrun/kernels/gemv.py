"""Decode GEMV (M = 1): y (N,) = dequant(W) (N, K) @ x (K,), never materialising W.

Each program owns BLOCK_N output rows and walks K in steps of G quantization blocks. Per step it loads the
(G, B) slice of x ONCE (converted to float32 once per thread), then, for each of its rows (an unrolled
loop, so the BLOCK_N row loads are independent and all in flight together), a (G, HB) tile of packed
bytes (HB = bytes per block: B/2 for int4, B for int8; 16-byte vectors per thread) and the G scales.
Per block it forms sum(value * x), subtracts offset * sum(x) (the zero point folded out of the inner loop)
and multiplies by the scale once:

    y[n] = sum_g s[n, g] * (sum_k value[n, k] x[k] - offset[n, g] * sum_k x[k])

so the per-weight work is: nibble extract, exponent-trick convert, one FMA. Few warps per program
(1-4) keep a whole K step of one row spread over all threads, and many programs fill the SMs.
With SILU the program also computes rows n + N_OUT (the "up" half) and writes silu(gate) * up.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import cast, int4_values, int8_values


@triton.jit
def _row_step(w_ptr, s_ptr, z_ptr, code_ptr, row, row_end, gi, gmask, xv, xs, stride_wn, stride_sn, stride_zn,
              ENC: tl.constexpr, B: tl.constexpr, G: tl.constexpr):
    """float32 scalar: one row's dot product with x over the G blocks `gi` (gmask: valid blocks); 0 for
    rows >= row_end."""
    HB: tl.constexpr = B if ENC == "int8_sym" else B // 2  # packed bytes per quantization block
    offs_b = tl.arange(0, HB)
    m = gmask & ((gi * 0 + row) < row_end)                                               # (G,)
    q = tl.load(w_ptr + row * stride_wn + gi[:, None] * HB + offs_b[None, :], mask=m[:, None], other=0)
    s = tl.load(s_ptr + row * stride_sn + gi, mask=m, other=0.0).to(tl.float32)          # (G,)
    if ENC == "int8_sym":
        w = int8_values(q)                                                                # (G, B)
    else:
        lo, hi = int4_values(q, code_ptr, ENC)                                            # (G, HB) each
        w = tl.reshape(tl.join(lo, hi), (G, B))  # element 2j from the low nibble, 2j+1 from the high
    part = tl.sum(w * xv, axis=1)                                                         # (G,)
    if ENC == "int4_asym":
        part -= tl.load(z_ptr + row * stride_zn + gi, mask=m, other=0).to(tl.float32) * xs
    elif ENC == "int4_sym":
        part -= 8.0 * xs
    elif ENC == "int8_sym":
        part -= 128.0 * xs
    return tl.sum(part * s, axis=0)


@triton.jit
def gemv_kernel(
    # pointers: x (K,), packed W (N, KP/2 or KP), scales (N, NB), zeros (N, NB) or dummy, NF4 table or dummy,
    # bias (N_OUT,) or dummy, y (N_OUT,)
    x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, bias_ptr, y_ptr,
    # sizes and strides (elements)
    N_OUT, K, NB, stride_wn, stride_sn, stride_zn,
    # meta
    ENC: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_N: tl.constexpr, G: tl.constexpr, INTERPRET: tl.constexpr = False,
):
    row0 = tl.program_id(0) * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, G)
    offs_k = tl.arange(0, B)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    up = tl.zeros((BLOCK_N,), tl.float32)
    for g0 in range(0, NB, G):
        gi = g0 + offs_g                                                  # (G,) block index
        gmask = gi < NB
        kk = gi[:, None] * B + offs_k[None, :]                            # (G, B) input index
        xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        xs = tl.sum(xv, axis=1)                                           # (G,)
        for r in tl.static_range(BLOCK_N):
            v = _row_step(w_ptr, s_ptr, z_ptr, code_ptr, row0 + r, N_OUT, gi, gmask, xv, xs, stride_wn, stride_sn,
                          stride_zn, ENC, B, G)
            acc = tl.where(offs_n == r, acc + v, acc)
            if SILU:
                v = _row_step(w_ptr, s_ptr, z_ptr, code_ptr, row0 + r + N_OUT, 2 * N_OUT, gi, gmask, xv, xs,
                              stride_wn, stride_sn, stride_zn, ENC, B, G)
                up = tl.where(offs_n == r, up + v, up)
    rows = row0 + offs_n
    rmask = rows < N_OUT
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc)) * up
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=rmask)
