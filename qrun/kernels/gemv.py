"""Decode GEMV (M = 1): y (N,) = dequant(W) (N, K) @ x (K,), never materialising W.

Each program owns BLOCK_N output rows and walks K in steps of G quantization blocks. One step loads a
(BLOCK_N, G, HB) tile of packed bytes (HB = bytes per block: B/2 for int4, B for int8; 16-byte vectors per
thread along HB), the (BLOCK_N, G) scales and the (G, B) slice of x. Per block it forms sum(value * x),
subtracts offset * sum(x) (the zero point folded out of the inner loop) and multiplies by the scale once:

    y[n] = sum_g s[n, g] * (sum_k value[n, k] x[k] - offset[n, g] * sum_k x[k])

so the per-weight work is: nibble extract, exponent-trick convert, one FMA.
With SILU the program also computes rows n + N_OUT (the "up" half) and writes silu(gate) * up.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import cast, int4_values, int8_values
from .pdl import pdl_enter


@triton.jit
def _gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows, rmask, K, NB, stride_wn, stride_sn, stride_zn,
               ENC: tl.constexpr, B: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr):
    """float32 (BLOCK_N,) dot products of weight rows `rows` with x."""
    HB: tl.constexpr = B if ENC == "int8_sym" else B // 2  # packed bytes per quantization block
    offs_g = tl.arange(0, G)
    offs_b = tl.arange(0, HB)
    offs_k = tl.arange(0, B)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for g0 in range(0, NB, G):
        gi = g0 + offs_g                                              # (G,) block index
        m2 = rmask[:, None] & (gi < NB)[None, :]                      # (BLOCK_N, G)
        wp = w_ptr + rows[:, None, None] * stride_wn + (gi[:, None] * HB + offs_b[None, :])[None, :, :]
        q = tl.load(wp, mask=m2[:, :, None], other=0)                 # (BLOCK_N, G, HB) packed
        s = tl.load(s_ptr + rows[:, None] * stride_sn + gi[None, :], mask=m2, other=0.0).to(tl.float32)
        kk = gi[:, None] * B + offs_k[None, :]                        # (G, B) input index
        xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        if ENC == "int8_sym":
            w = int8_values(q)                                        # (BLOCK_N, G, B)
        else:
            lo, hi = int4_values(q, code_ptr, ENC)                    # (BLOCK_N, G, HB) each
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, G, B))          # element 2j low nibble, 2j+1 high
        part = tl.sum(w * xv[None, :, :], axis=2)                     # (BLOCK_N, G)
        if ENC != "nf4":
            xs = tl.sum(xv, axis=1)                                   # (G,)
            if ENC == "int4_asym":
                z = tl.load(z_ptr + rows[:, None] * stride_zn + gi[None, :], mask=m2, other=0).to(tl.float32)
                part = part - z * xs[None, :]
            elif ENC == "int4_sym":
                part = part - 8.0 * xs[None, :]
            else:
                part = part - 128.0 * xs[None, :]
        acc += tl.sum(part * s, axis=1)
    return acc


@triton.jit
def gemv_kernel(
    # pointers: x (K,), packed W (N, KP/2 or KP), scales (N, NB), zeros (N, NB) or dummy, NF4 table or dummy,
    # bias (N_OUT,) or dummy, y (N_OUT,)
    x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, bias_ptr, y_ptr,
    # sizes and strides (elements)
    N_OUT, K, NB, stride_wn, stride_sn, stride_zn,
    # meta
    ENC: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_N: tl.constexpr, G: tl.constexpr, INTERPRET: tl.constexpr = False, PDL: tl.constexpr = False,
):
    if PDL:  # pdl.py: x comes from an earlier kernel
        pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N_OUT
    acc = _gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows, rmask, K, NB, stride_wn, stride_sn,
                     stride_zn, ENC, B, G, BLOCK_N)
    if SILU:
        up = _gemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows + N_OUT, rmask, K, NB, stride_wn,
                        stride_sn, stride_zn, ENC, B, G, BLOCK_N)
        acc = acc / (1.0 + tl.exp(-acc)) * up
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=rmask)
