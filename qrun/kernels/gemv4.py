"""Decode GEMV (M = 1) for int4_sym / int4_asym on whole 32-bit words: y (N,) = dequant(W) (N, K) @ x (K,).

The canonical packed weight (N, Kp/2) uint8 is read as (N, Kp/8) int32 words (a free .view: Kp is a multiple
of the block size B >= 32). Word w of a row holds k = 8w .. 8w+7, element 8w+i in bits 4i..4i+3 (low nibble
= even k, little-endian bytes). Each thread loads 4 consecutive words of a row (one 16-byte vector load).

Nibble -> float32 without I2F, one PRMT per weight (inline PTX): e = w & 0x0F0F0F0F holds the even
nibbles one per byte, o = (w >> 4) & 0x0F0F0F0F the odd ones; `prmt` moves byte b of e (or o) into bits
16..23 under the exponent byte 0x43 (float 2^7, whose mantissa step at bit 16 is exactly 1), so the float
is 128 + u. For int4_sym the word is first XORed with 0x88888888 (two's complement q -> u = q + 8).
Every weight then has the same offset, folded out once per word:

    sum_k q_k x_k = sum_k f_k x_k - (128 + offset) sum_k x_k          (offset 8 for sym; z per block for asym)

sum x depends on x only, so it is computed once per word position and shared by every row a thread holds
(each thread holds BLOCK_N rows: the x slice is loaded and converted once per step for all of them).
Per 8 weights per row: 3 LOP3/SHF + 8 PRMT + 8 FFMA, then one FFMA per 4 words for the block scale
(~3.5 SASS instructions per weight in the loop, against ~6-7 for the byte-wise gemv.py). The offset 128
against values of size ~8 costs ~5 bits of fp32's 24: ~1e-6 relative error. The interpreter, which cannot
run inline asm, takes the same values from shifts and masks (ASM=False).

Tile per step: (BLOCK_N rows, G blocks, B/8 words). Triton lays threads and warps out from the contiguous
dimension first, so with G * B/32 >= 32 * num_warps every thread holds all BLOCK_N rows of its 4 words and
the warps split K inside the program (reduced once at the end). The next step's words and scales are
loaded before the current step is computed (two steps of loads in flight per thread).
With SILU the program computes gate rows n and up rows n + N_OUT in the same loop (x shared) and writes
silu(gate) * up.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import cast
from .pdl import pdl_enter


@triton.jit
def _load_words(w_ptr, s_ptr, rows, g0, NB, stride_wn, stride_sn,
                B: tl.constexpr, G: tl.constexpr):
    """(ROWS, G, T, 4) int32 words (T = B/32 threads per block, 4 consecutive words = one 16-byte load per
    thread) and (ROWS, G) float32 scales of blocks g0 .. g0+G-1 (masked past NB)."""
    WPB: tl.constexpr = B // 8
    T: tl.constexpr = WPB // 4
    gi = g0 + tl.arange(0, G)
    gm = gi < NB
    col = (gi[:, None, None] * WPB + tl.arange(0, T)[None, :, None] * 4
           + tl.arange(0, 4)[None, None, :])                                   # (G, T, 4) word index
    roff = tl.multiple_of(rows * stride_wn, WPB)                               # rows are B/8-word aligned
    w = tl.load(w_ptr + roff[:, None, None, None] + col[None, :, :, :], mask=gm[None, :, None, None], other=0)
    s = tl.load(s_ptr + rows[:, None] * stride_sn + gi[None, :], mask=gm[None, :], other=0.0)
    return w, s.to(tl.float32)


@triton.jit
def _split8(v):
    """(..., 8) -> its 8 slices along the last (in-thread) dimension."""
    a, b = tl.split(tl.reshape(v, v.shape[:-1] + (4, 2)))       # even / odd i
    a0, a1 = tl.split(tl.reshape(a, a.shape[:-1] + (2, 2)))     # i = 0,4 | 2,6
    b0, b1 = tl.split(tl.reshape(b, b.shape[:-1] + (2, 2)))     # i = 1,5 | 3,7
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _nibbles(w, SYM: tl.constexpr, ASM: tl.constexpr):
    """(...) int32 words -> 8 float32 tensors f_i = 128 + u_i, u_i = nibble i (k = 8 word + i), XORed with 8
    for int4_sym. GPU: one PRMT per weight (byte b of the even/odd-nibble word moved under a 2^7 exponent).
    Interpreter (no inline asm there): the same values with shifts and masks."""
    if ASM:
        if SYM:
            pre: tl.constexpr = "xor.b32 w, $8, 0x88888888; "
        else:
            pre: tl.constexpr = "mov.b32 w, $8; "
        f0, f1, f2, f3, f4, f5, f6, f7 = tl.inline_asm_elementwise(
            "{ .reg .b32 w, e, o, c; " + pre +
            "mov.b32 c, 0x43000000; and.b32 e, w, 0x0F0F0F0F; shr.u32 o, w, 4; and.b32 o, o, 0x0F0F0F0F; "
            "prmt.b32 $0, e, c, 0x7044; prmt.b32 $1, o, c, 0x7044; "
            "prmt.b32 $2, e, c, 0x7144; prmt.b32 $3, o, c, 0x7144; "
            "prmt.b32 $4, e, c, 0x7244; prmt.b32 $5, o, c, 0x7244; "
            "prmt.b32 $6, e, c, 0x7344; prmt.b32 $7, o, c, 0x7344; }",
            "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        if SYM:
            w = w ^ -0x77777778
        f0 = ((w & 0xF) << 16) | 0x43000000
        f1 = (((w >> 4) & 0xF) << 16) | 0x43000000
        f2 = (((w >> 8) & 0xF) << 16) | 0x43000000
        f3 = (((w >> 12) & 0xF) << 16) | 0x43000000
        f4 = ((w & 0xF0000) | 0x43000000)
        f5 = (((w >> 20) & 0xF) << 16) | 0x43000000
        f6 = (((w >> 24) & 0xF) << 16) | 0x43000000
        f7 = (((w >> 28) & 0xF) << 16) | 0x43000000
    return (f0.to(tl.float32, bitcast=True), f1.to(tl.float32, bitcast=True),
            f2.to(tl.float32, bitcast=True), f3.to(tl.float32, bitcast=True),
            f4.to(tl.float32, bitcast=True), f5.to(tl.float32, bitcast=True),
            f6.to(tl.float32, bitcast=True), f7.to(tl.float32, bitcast=True))


@triton.jit
def _step(x_ptr, nw_ptr, z_ptr, w, s, rows, g0, K, NB, stride_zn,
          ENC: tl.constexpr, B: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr, NORM: tl.constexpr):
    """float32 (ROWS, G, T) partial dot products of one step: words w (ROWS, G, T, 4) and scales s (ROWS, G)
    of blocks g0 .. g0+G-1, against x[g0 B : (g0 + G) B] (times the norm weight with NORM), and the
    (G, T, 4) per-thread sums of x^2 over the slice (for the RMSNorm scale; zeros without NORM)."""
    WPB: tl.constexpr = B // 8
    T: tl.constexpr = WPB // 4
    kx = (tl.arange(0, G)[:, None, None, None] * B + tl.arange(0, T)[None, :, None, None] * 32
          + tl.arange(0, 4)[None, None, :, None] * 8 + tl.arange(0, 8)[None, None, None, :])  # (G, T, 4, 8)
    kk = g0 * B + kx
    xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)             # (G, T, 4, 8)
    if NORM:  # y = W (nw * x) * rsqrt(mean(x^2) + eps): the scalar rsqrt is applied in _finish
        sq = tl.sum(xv * xv, axis=3)
        xv = xv * tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
    else:
        sq = tl.zeros(xv.shape[:3], tl.float32)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xv)                                # (G, T, 4) each
    # every f_i = 128 + u_i: sum_k q_k x_k = sum_k f_k x_k - (128 + offset) sum_k x_k
    xs = (x0 + x2 + x4 + x6) + (x1 + x3 + x5 + x7)                             # (G, T, 4)
    f0, f1, f2, f3, f4, f5, f6, f7 = _nibbles(w, ENC == "int4_sym", ASM)       # (ROWS, G, T, 4) each
    if ENC == "int4_sym":
        cx = 136.0 * xs
    else:
        cx = 128.0 * xs
    part = f0 * x0[None] - cx[None]
    part += f1 * x1[None]
    part += f2 * x2[None]
    part += f3 * x3[None]
    part += f4 * x4[None]
    part += f5 * x5[None]
    part += f6 * x6[None]
    part += f7 * x7[None]
    part = tl.sum(part, axis=3)                                                 # in-thread: (ROWS, G, T)
    if ENC == "int4_asym":
        gi = g0 + tl.arange(0, G)
        z = tl.load(z_ptr + rows[:, None] * stride_zn + gi[None, :], mask=(gi < NB)[None, :],
                    other=0).to(tl.float32)
        part -= z[:, :, None] * tl.sum(xs, axis=2)[None, :, :]
    return part * s[:, :, None], sq


@triton.jit
def _rows_of(rb, N_OUT, BLOCK_N: tl.constexpr, SILU: tl.constexpr):
    """Weight rows of row block rb, clamped into range (every load in bounds, no row mask on the weight
    loads): (BLOCK_N,) or, with SILU, (2 BLOCK_N,) = gate row r and up row r + N_OUT side by side."""
    rl = tl.minimum(rb * BLOCK_N + tl.arange(0, BLOCK_N), N_OUT - 1)
    if SILU:
        rl = tl.reshape(rl[:, None] + (tl.arange(0, 2) * N_OUT)[None, :], (2 * BLOCK_N,))
    return rl


@triton.jit
def _finish(acc, rstd, rb, bias_ptr, res_ptr, y_ptr, N_OUT, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_RES: tl.constexpr, SILU: tl.constexpr, INTERPRET: tl.constexpr):
    """acc (ROWS, G, T) of row block rb -> y rows: * rstd (RMSNorm, 1 without), + bias, SiLU*mul, + residual."""
    out = tl.sum(tl.sum(acc, axis=2), axis=1) * rstd
    rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N_OUT
    if HAS_BIAS:  # (SILU has no bias)
        out += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if SILU:
        gate, up = tl.split(tl.reshape(out, (BLOCK_N, 2)))
        out = gate / (1.0 + tl.exp(-gate)) * up
    if HAS_RES:
        out += tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, cast(out, y_ptr.dtype.element_ty, INTERPRET), mask=rmask)


@triton.jit
def gemv_int4_kernel(
    # pointers: x (K,), W as int32 words (N, KP/8), scales (N, NB), zeros (N, NB) or dummy,
    # bias (N_OUT,) or dummy, RMSNorm weight (K,) or dummy, residual (N_OUT,) or dummy, y (N_OUT,)
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, nw_ptr, res_ptr, y_ptr,
    # sizes and strides (elements; stride_wn in int32 words); eps of the RMSNorm
    N_OUT, K, NB, stride_wn, stride_sn, stride_zn, eps,
    # meta
    ENC: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, G: tl.constexpr, PERSIST: tl.constexpr = False, PDL: tl.constexpr = False,
    INTERPRET: tl.constexpr = False,
):
    """Program p owns row blocks p, p + P, p + 2P, ... (P programs; P = number of row blocks unless
    PERSIST) and walks each over K in steps of G blocks. The loop is flattened over (row block, step), so a
    persistent program streams from one row block into the next without draining: the next step's words
    and scales (possibly of the next row block) are loaded before the current step is computed.
    With PDL the first step's loads are issued before waiting on the previous kernel (pdl.py).
    NORM: x is RMS-normalised on the fly (y = W (nw * x) / rms(x)); every program walks all of K for its
    first row block, so it sums x^2 there and keeps the scale for its later row blocks. HAS_RES: y += res."""
    ASM: tl.constexpr = not INTERPRET
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_rb = tl.cdiv(N_OUT, BLOCK_N)
    steps = tl.cdiv(NB, G)
    total = tl.cdiv(n_rb - pid, nprog) * steps    # (row block, step) pairs of this program
    w, s = _load_words(w_ptr, s_ptr, _rows_of(pid, N_OUT, BLOCK_N, SILU), 0, NB, stride_wn, stride_sn, B, G)
    if PDL:
        pdl_enter(PDL)
    acc = tl.zeros((BLOCK_N * (2 if SILU else 1), G, B // 32), tl.float32)
    ssq = tl.zeros((G, B // 32, 4), tl.float32)  # per-thread sums of x^2 (first row block only)
    rstd = tl.full((), 1.0, tl.float32)
    for it in range(0, total):
        j = it // steps
        g0 = (it - j * steps) * G
        rb = pid + j * nprog
        rows = _rows_of(rb, N_OUT, BLOCK_N, SILU)
        # next step's loads first (the next row block's first step at the end of a row): they fly while
        # this step computes; past the last step they are masked off (g >= NB).
        it1 = it + 1
        j1 = it1 // steps
        g1 = tl.where(it1 < total, (it1 - j1 * steps) * G, NB)
        w_n, s_n = _load_words(w_ptr, s_ptr, _rows_of(pid + j1 * nprog, N_OUT, BLOCK_N, SILU), g1, NB,
                               stride_wn, stride_sn, B, G)
        part, sq = _step(x_ptr, nw_ptr, z_ptr, w, s, rows, g0, K, NB, stride_zn, ENC, B, G, ASM, NORM)
        acc += part
        if NORM:
            if j == 0:
                ssq += sq
        if g0 + G >= NB:  # last step of this row block
            if NORM:
                if j == 0:
                    rstd = tl.rsqrt(tl.sum(tl.sum(tl.sum(ssq, axis=2), axis=1), axis=0) / K + eps)
            _finish(acc, rstd, rb, bias_ptr, res_ptr, y_ptr, N_OUT, BLOCK_N, HAS_BIAS, HAS_RES, SILU,
                    INTERPRET)
            acc = tl.zeros_like(acc)
        w, s = w_n, s_n
