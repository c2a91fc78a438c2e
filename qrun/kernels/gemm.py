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
def _tc16_tile(w_ptr, row0, row_lim, kb0, stride_wn, BLOCK_N: tl.constexpr, BKB: tl.constexpr):
    """uint8 (BLOCK_N, BKB): packed bytes [row0 + n, kb0 + p] of a "tc16" weight, read in memory order and
    put in (row, byte) order in registers. Why: gathering them at their (row, byte) addresses, as the other
    layouts do, makes 2-byte loads (the layout's runs along K are 2 bytes), and the M = 1024 GEMM on tc16 ran
    at 0.25x cuBLAS against il4's 0.45-0.6x (PERF.md round 7). In memory a tile of 16 rows x 32 bytes is 512
    contiguous bytes [(p % 8) // 2, n % 8, (p % 32) // 8, (n % 16) // 8, p % 2] (layout.py); row0 is a
    multiple of 16, kb0 of min(BKB, 32)."""
    T: tl.constexpr = BLOCK_N // 16
    C: tl.constexpr = (BKB + 31) // 32                # 512-byte chunks along K per 16 rows
    NB8: tl.constexpr = BKB // C // 8                 # (p % 32) // 8 takes NB8 values (4 unless BKB < 32)
    CH: tl.constexpr = 128 * NB8                      # bytes of one tile's chunk that this K tile reads
    t = tl.arange(0, T)
    e = tl.arange(0, CH)
    if NB8 == 4:  # whole chunks: e is the byte offset itself, so the loads are contiguous and vectorize
        eo = e
    else:  # part of a chunk (BKB < 32, the interpreter's small tiles): [a, r, b, h, l] with b < NB8
        eo = (e // (32 * NB8)) * 128 + ((e // (4 * NB8)) % 8) * 16 + ((kb0 % 32) // 8 + (e // 4) % NB8) * 4 \
            + e % 4
    off = (row0 // 16 + t)[:, None, None] * (16 * stride_wn) + \
        ((kb0 // 32 + tl.arange(0, C)) * 512)[None, :, None] + eo[None, None, :]       # (T, C, CH)
    tmask = (row0 + t * 16) < row_lim
    q = tl.load(w_ptr + off, mask=tmask[:, None, None], other=0)
    q = tl.reshape(q, (T, C, 4, 8, NB8, 2, 2))        # [t, c, a = (p%8)//2, r = n%8, b = (p%32)//8, h, l]
    q = tl.permute(q, (0, 5, 3, 1, 4, 2, 6))          # [t, h, r, c, b, a, l]: n = 16t + 8h + r, p = 32c + 8b + 2a + l
    return tl.reshape(q, (BLOCK_N, BKB))


@triton.jit
def _il4_tile(w_ptr, row0, row_lim, kb0, stride_wn, BLOCK_N: tl.constexpr, BKB: tl.constexpr,
              EVEN: tl.constexpr = False):
    """uint8 (BLOCK_N, BKB): packed bytes [row0 + n, kb0 + p] of an "il4" weight, read in memory order (the
    4 * BKB bytes of each 4-row group are contiguous: [p // 4, n % 4, p % 4]) and put in (row, byte) order in
    registers. Why: gathered at their (row, byte) addresses they made 4-byte cp.async copies, 16-byte ones
    this way. row0 and kb0 are multiples of 4."""
    R: tl.constexpr = BLOCK_N // 4
    g = tl.arange(0, R)
    off = (row0 // 4 + g)[:, None] * (4 * stride_wn) + (kb0 // 4) * 16 + tl.arange(0, 4 * BKB)[None, :]
    if EVEN:  # every row of the tile exists
        q = tl.load(w_ptr + off)                                                     # (R, 4 * BKB)
    else:
        q = tl.load(w_ptr + off, mask=((row0 + 4 * g) < row_lim)[:, None], other=0)
    q = tl.permute(tl.reshape(q, (R, BKB // 4, 4, 4)), (0, 2, 1, 3))               # [g, n % 4, p // 4, p % 4]
    return tl.reshape(q, (BLOCK_N, BKB))


@triton.jit
def _wgmma_done(acc):
    """acc (float32, the wgmma accumulator) once every wgmma issued before has finished: an inline-asm copy (4
    registers a call; ptxas drops the moves), which triton may only give the accumulator after a
    `wgmma.wait_group 0`. Why: triton 3.6's pipeliner splits a K step's tl.dot into one wgmma per 16 k and
    leaves up to N - 1 of the N in flight (only the oldest is waited for), so the next step's dequantization
    overwrote the register A operand of a wgmma still in flight (triton issue 9433; wrong rows now and then on
    the H100, PERF.md attempt 61). With a use of the accumulator after each K step's dot, that dot is waited
    for as a whole: the step's wgmmas still run back to back, and the next step's operand is written only
    after them. ptxas serializes some variants' wgmmas by itself (C7515), which hid the race there, but not
    all: the offline SASS of the split-K loop, of bias and gate+up variants and of small-M tiles wrote operands
    in flight (benchmarks/compile_check.py finds them)."""
    return tl.inline_asm_elementwise("wgmma.wait_group.sync.aligned 0; mov.b32 $0, $4; mov.b32 $1, $5; "
                                     "mov.b32 $2, $6; mov.b32 $3, $7;", "=r,=r,=r,=r,r,r,r,r", [acc],
                                     dtype=tl.float32, is_pure=False, pack=4)


@triton.jit
def _gemm_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows, row0, row_lim, rmask, offs_m, mmask, K, KP, stride_xm,
               stride_wn, stride_sn, stride_zn,
               ENC: tl.constexpr, B: tl.constexpr, SPLIT_K: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
               LAY: tl.constexpr, INTERPRET: tl.constexpr, EVEN: tl.constexpr = False):
    """float32 (BLOCK_N, BLOCK_M) = W[rows] @ x[offs_m]^T over this program's share of K."""
    BKB: tl.constexpr = BLOCK_K if ENC == "int8_sym" else BLOCK_K // 2  # packed bytes per K tile
    offs_kb = tl.arange(0, BKB)
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # the weight's address arithmetic for il4 and tc16 is in _il4_tile / _tc16_tile
    if LAY == 1:  # element [n, c] of an (N, C) part lives at [n // 4, c // e, n % 4, c % e] (e = 4 bytes, 1 scale)
        srow = (rows // 4) * (4 * stride_sn) + (rows % 4)
        zrow = (rows // 4) * (4 * stride_zn) + (rows % 4)
    elif LAY == 2:  # byte [n, p] at [n // 16, p // 32, (p % 8) // 2, n % 8, (p % 32) // 8, (n % 16) // 8, p % 2]
        srow = (rows // 16) * (16 * stride_sn) + (rows % 16)                   # scales [n // 16, g, n % 16]
        zrow = (rows // 16) * (16 * stride_zn) + (rows % 16)
    else:
        wrow = rows * stride_wn
        srow = rows * stride_sn
        zrow = rows * stride_zn
    for kt in range(tl.program_id(2), tl.cdiv(KP, BLOCK_K), SPLIT_K):
        k0 = kt * BLOCK_K
        # KP is a multiple of B, and B of BLOCK_K: no mask along K for the weight.
        kb0 = k0 // (BLOCK_K // BKB)                                            # first byte column
        if LAY == 1:
            q = _il4_tile(w_ptr, row0, row_lim, kb0, stride_wn, BLOCK_N, BKB, EVEN)
        elif LAY == 2:
            q = _tc16_tile(w_ptr, row0, row_lim, kb0, stride_wn, BLOCK_N, BKB)
        else:
            q = tl.load(w_ptr + wrow[:, None] + (kb0 + offs_kb)[None, :], mask=rmask[:, None], other=0)  # (BN, BKB)
        g = k0 // B
        if LAY == 1:
            g = g * 4
        elif LAY == 2:
            g = g * 16
        if EVEN:
            s = tl.load(s_ptr + srow + g).to(tl.float32)  # (BLOCK_N,)
        else:
            s = tl.load(s_ptr + srow + g, mask=rmask, other=0.0).to(tl.float32)
        if ENC == "int4_asym":
            if EVEN:
                c = -tl.load(z_ptr + zrow + g).to(tl.float32) * s
            else:
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
        if EVEN:  # whole M and K tiles
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None])    # (BLOCK_K, BLOCK_M)
        else:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
                         mask=mmask[None, :] & (kk < K)[:, None], other=0.0)
        w = cast(w, xt.dtype, INTERPRET)
        if INTERPRET:  # the CPU interpreter's bf16/fp16 tl.dot is wrong (triton 3.9): same roundings, fp32 dot
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        if SWAP:
            acc = tl.dot(w, xt, acc, input_precision="ieee" if INTERPRET else None)           # (BN, BM)
            if not INTERPRET:
                acc = _wgmma_done(acc)
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
    LAY: tl.constexpr = 0, INTERPRET: tl.constexpr = False, EVEN: tl.constexpr = False,
):
    """EVEN: M, N_OUT and K are whole multiples of the tiles (K = KP), so no load needs a mask."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N_OUT
    mmask = offs_m < M
    row0 = tl.program_id(0) * BLOCK_N
    acc = _gemm_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows, row0, N_OUT, rmask, offs_m, mmask, K, KP, stride_xm,
                     stride_wn, stride_sn, stride_zn, ENC, B, SPLIT_K, BLOCK_N, BLOCK_M, BLOCK_K, SWAP, LAY,
                     INTERPRET, EVEN)
    if SILU:  # the launcher never combines SILU with SPLIT_K > 1 (silu is not additive)
        up = _gemm_rows(x_ptr, w_ptr, s_ptr, z_ptr, code_ptr, rows + N_OUT, row0 + N_OUT, 2 * N_OUT, rmask, offs_m,
                        mmask, K, KP,
                        stride_xm, stride_wn, stride_sn, stride_zn, ENC, B, SPLIT_K, BLOCK_N, BLOCK_M,
                        BLOCK_K, SWAP, LAY, INTERPRET, EVEN)
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
