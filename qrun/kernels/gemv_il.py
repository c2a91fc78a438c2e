"""Decode GEMV (M = 1) for int4_sym / int4_asym on the row-interleaved layout: y (N,) = dequant(W) (N, K) @ x (K,).

Layout "il4" (made at load time by `interleave4`, qrun/kernels/layout.py): rows are interleaved by 4 at int32-word
granularity, words (N/4, KW, 4) with w[r, kw, j] = word kw of row 4 r + j (KW = Kp / 8; a word holds
k = 8 kw .. 8 kw + 7, nibble i = element 8 kw + i, low nibble first, as in the canonical layout); scales and
zeros (N/4, NB, 4) likewise.

Why: one 16-byte load of a thread is then 4 rows x the same 8 k, so the thread needs exactly one 16-byte
load of x (8 k) for it, and Triton gives the words and x the same register layout. In the canonical layout a
thread's 16 bytes are 32 k of one row, its x slice is 4 vectors that Triton lays out across threads, and
the kernel paid one shared-memory layout conversion (STSM + LDS + barrier) per x slice per step: 9 a step,
seen in the SASS. Measured on the H100 (benchmarks/gemv_lab.py, docs/PERF.md round 4): 7B gate+up
53 -> 35 us.

Nibble -> float without I2F: `_dot_words` is one inline-asm block per word, 8 PRMT that put a nibble under
the exponent of 2^7 (float 128 + u) and 8 FFMA against x; the common offset is folded out with sum(x):
    sum_k q_k x_k = sum_k f_k x_k - (128 + offset) sum_k x_k    (offset 8 for sym, the block's zero for asym)
The interpreter (no inline asm) takes the same values from shifts and masks.

Program: R4 groups of 4 rows; a step covers G quantization blocks of B = 128 k: the tile (R4, G, B/8, 4) words,
one word position (4 rows x 8 k) per thread and R4 16-byte loads per thread; G * B/8 threads. The next
step's words and scales are loaded before the current step is computed. With SPLIT > 1, SPLIT programs share
a row group's K and the last to finish sums their partials.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import cast
from .gemv4 import _nibbles, _split8
from .l2 import l2_prefetch
from .pdl import pdl_enter
from .rope_cache import rotate_half


@triton.jit
def _dot_words(w, x0, x1, x2, x3, x4, x5, x6, x7, c, SYM: tl.constexpr):
    """float32 sum_i (128 + u_i) x_i + c per int32 word (u_i = nibble i, XORed with 8 for int4_sym).
    One asm block per word keeps its 8 floats inside the block: one live result register per word."""
    if SYM:
        pre: tl.constexpr = "xor.b32 w, $1, 0x88888888; "
    else:
        pre: tl.constexpr = "mov.b32 w, $1; "
    return tl.inline_asm_elementwise(
        "{ .reg .b32 w, e, o, k, t, a; " + pre +
        "mov.b32 k, 0x43000000; and.b32 e, w, 0x0F0F0F0F; shr.u32 o, w, 4; and.b32 o, o, 0x0F0F0F0F; "
        "prmt.b32 t, e, k, 0x7044; fma.rn.f32 a, t, $2, $10; "
        "prmt.b32 t, o, k, 0x7044; fma.rn.f32 a, t, $3, a; "
        "prmt.b32 t, e, k, 0x7144; fma.rn.f32 a, t, $4, a; "
        "prmt.b32 t, o, k, 0x7144; fma.rn.f32 a, t, $5, a; "
        "prmt.b32 t, e, k, 0x7244; fma.rn.f32 a, t, $6, a; "
        "prmt.b32 t, o, k, 0x7244; fma.rn.f32 a, t, $7, a; "
        "prmt.b32 t, e, k, 0x7344; fma.rn.f32 a, t, $8, a; "
        "prmt.b32 t, o, k, 0x7344; fma.rn.f32 a, t, $9, a; mov.b32 $0, a; }",
        "=f,r,f,f,f,f,f,f,f,f,f", [w, x0, x1, x2, x3, x4, x5, x6, x7, c], dtype=tl.float32, is_pure=True,
        pack=1)


@triton.jit
def _offsets(rg, N4, NB, B: tl.constexpr, G: tl.constexpr, R4: tl.constexpr):
    """Word offsets (R4, G, B/8, 4) and scale offsets (R4, G, 1, 4) of step 0 for the row groups rg (R4,)."""
    WPB: tl.constexpr = B // 8
    rg = tl.minimum(rg, N4 - 1)  # clamped: every load in bounds, no row mask on the weight loads
    g = tl.arange(0, G)
    j = tl.arange(0, 4)
    woff = (rg[:, None, None, None] * (NB * WPB * 4)
            + (g[None, :, None, None] * WPB + tl.arange(0, WPB)[None, None, :, None]) * 4
            + j[None, None, None, :])
    soff = rg[:, None, None, None] * (NB * 4) + g[None, :, None, None] * 4 + j[None, None, None, :]
    return woff, soff


@triton.jit
def _load_step(w_ptr, s_ptr, z_ptr, woff, soff, g0, gend, B: tl.constexpr, G: tl.constexpr, ENC: tl.constexpr):
    """Words (R4, G, B/8, 4), scales and zeros (R4, G, 1, 4) float32 of blocks g0 .. g0 + G - 1 (masked
    from gend, the program's last block + 1: a step past it loads nothing)."""
    WPB: tl.constexpr = B // 8
    gm = ((g0 + tl.arange(0, G)) < gend)[None, :, None, None]
    w = tl.load(w_ptr + woff + g0 * (WPB * 4), mask=gm, other=0)
    s = tl.load(s_ptr + soff + g0 * 4, mask=gm, other=0.0).to(tl.float32)
    if ENC == "int4_asym":
        z = tl.load(z_ptr + soff + g0 * 4, mask=gm, other=0).to(tl.float32)
    else:
        z = s
    return w, s, z


@triton.jit
def _prefetch_blocks(w_ptr, s_ptr, z_ptr, rg0, N4, NB, g0, g1, R4: tl.constexpr, WPB: tl.constexpr,
                     ENC: tl.constexpr):
    """L2 prefetch of blocks g0 .. g1 - 1 (nothing when g1 <= g0) of the R4 row groups from rg0 (clamped to the
    last, as the loads are): their words, scales and zeros. A row group's blocks are contiguous in il4."""
    for i in tl.static_range(R4):
        base = tl.minimum(rg0 + i, N4 - 1) * NB
        l2_prefetch(w_ptr + (base + g0) * (WPB * 4), w_ptr + (base + g1) * (WPB * 4))
        l2_prefetch(s_ptr + (base + g0) * 4, s_ptr + (base + g1) * 4)
        if ENC == "int4_asym":
            l2_prefetch(z_ptr + (base + g0) * 4, z_ptr + (base + g1) * 4)


@triton.jit
def _rows_dot(acc, w, s, z, x0, x1, x2, x3, x4, x5, x6, x7, xs, ENC: tl.constexpr, ASM: tl.constexpr):
    """acc (R4, G, B/8, 4) += scale * sum_i q_i x_i for every word of the step; x_i and xs = sum_i x_i are
    (1, G, B/8, 1)."""
    if ENC == "int4_sym":
        c = -136.0 * xs  # f = 128 + (q + 8)
    else:
        c = -128.0 * xs  # f = 128 + u, q = u - z: the zero is taken off below
    if ASM:
        d = _dot_words(w, x0, x1, x2, x3, x4, x5, x6, x7, c, ENC == "int4_sym")
    else:
        f0, f1, f2, f3, f4, f5, f6, f7 = _nibbles(w, ENC == "int4_sym", False)
        d = (f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3) + (f4 * x4 + f5 * x5 + f6 * x6 + f7 * x7) + c
    if ENC == "int4_asym":
        d -= z * xs
    return acc + d * s


@triton.jit
def gemv_il4_kernel(
    # pointers: x (K,), words (N/4, KW, 4) int32, scales (N/4, NB, 4), zeros (N/4, NB, 4) or dummy,
    # bias (N_OUT,) or dummy, RMSNorm weight (K,) or dummy, residual (N_OUT,) or dummy, y (N_OUT,);
    # SPLIT > 1: partials (programs, SPLIT, PW) float32 and arrival counters (programs,) int32 (zeros), else dummies
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, nw_ptr, res_ptr, y_ptr, part_ptr, cnt_ptr,
    N_OUT, K, NB, NBS, eps,
    ENC: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr,
    HAS_RES: tl.constexpr, R4: tl.constexpr, G: tl.constexpr, DEEP: tl.constexpr = False,
    SPLIT: tl.constexpr = 1, PF: tl.constexpr = 0, PDL: tl.constexpr = False, INTERPRET: tl.constexpr = False,
    # ROPE > 0 (the head dim): the qkv projection of one token, rotated and written where RoPE + the cache write
    # would put it (_rope_epilogue): cos/sin (S, ROPE) float32, the position (1,) int64, k/v caches (KV, S, ROPE)
    ROPE: tl.constexpr = 0, cos_ptr=None, sin_ptr=None, pos_ptr=None, kc_ptr=None, vc_ptr=None, NH=0, NKV=0, S=0,
):
    """Program (p, sp): output row groups p R4 .. p R4 + R4 - 1 (4 rows each), over blocks sp NBS .. (sp + 1)
    NBS - 1 of K (NBS a multiple of G; all of K when SPLIT == 1) in steps of G blocks.
    SILU: also the up rows (row group + N_OUT / 4) with the same x, then silu(gate) * up.
    NORM: y = W (nw * x) * rsqrt(mean(x^2) + eps), the sum of x^2 taken on the way over the program's share of
    x. HAS_RES: y += residual. PDL: the first step's weights are loaded before waiting on the previous kernel
    (pdl.py). DEEP: three steps of weights in flight instead of two (long K walks with few programs).
    SPLIT: programs per row group along K, for shapes whose row groups alone give too few bytes in flight per
    SM (7B down: 896 programs of 19 steps). Each stores its partial sums (and its sum of x^2), and the last of
    a row group to arrive (an acq_rel counter, the pattern of gemv_tc16_kernel) adds them in split order, does
    the epilogue and resets the counter.
    PF (l2.py): 0 none; 1 the program's whole share of the weights, scales and zeros is prefetched into L2 at its
    start; n > 1 a window n steps ahead of the step computed (prefetched at the start, then one step a step).
    ROPE (R4 = 2, PF 0, no SILU or residual): program p takes the row groups j and j + ROPE / 8 of head p // (ROPE
    / 8), j = p % (ROPE / 8): rows i and i + ROPE / 2 of the head, the pair RoPE rotates, so the epilogue rotates q
    and k and writes q to y (NH, ROPE), k and v into the caches at the position: no RoPE kernel after it."""
    ASM: tl.constexpr = not INTERPRET
    PFW: tl.constexpr = PF > 0 and not INTERPRET
    WPB: tl.constexpr = B // 8
    N4 = N_OUT // 4
    pid = tl.program_id(0)
    gstart = tl.program_id(1) * NBS
    gend = tl.minimum(gstart + NBS, NB)
    if ROPE:
        HALF: tl.constexpr = ROPE // 8  # row groups in half a head
        rg = (pid // HALF) * (2 * HALF) + pid % HALF + tl.arange(0, R4) * HALF
    else:
        rg = pid * R4 + tl.arange(0, R4)
    if PFW:  # before anything else: these bytes depend on nothing earlier kernels write
        pf_end = gend if PF == 1 else tl.minimum(gstart + PF * G, gend)
        _prefetch_blocks(w_ptr, s_ptr, z_ptr, pid * R4, N4, NB, gstart, pf_end, R4, WPB, ENC)
        if SILU:
            _prefetch_blocks(w_ptr, s_ptr, z_ptr, pid * R4 + N4, N4 * 2, NB, gstart, pf_end, R4, WPB, ENC)
    woff, soff = _offsets(rg, N4, NB, B, G, R4)
    w, s, z = _load_step(w_ptr, s_ptr, z_ptr, woff, soff, gstart, gend, B, G, ENC)
    if SILU:
        uoff, usoff = _offsets(rg + N4, N4 * 2, NB, B, G, R4)
        wu, su, zu = _load_step(w_ptr, s_ptr, z_ptr, uoff, usoff, gstart, gend, B, G, ENC)
    if DEEP:  # the second step too, before waiting
        w1, s1, z1 = _load_step(w_ptr, s_ptr, z_ptr, woff, soff, gstart + G, gend, B, G, ENC)
        if SILU:
            wu1, su1, zu1 = _load_step(w_ptr, s_ptr, z_ptr, uoff, usoff, gstart + G, gend, B, G, ENC)
    AHEAD: tl.constexpr = 2 * G if DEEP else G  # blocks between the step computed and the step loaded
    if PDL:
        pdl_enter(PDL)
    acc = tl.zeros((R4, G, WPB, 4), tl.float32)
    if SILU:
        acc_u = tl.zeros((R4, G, WPB, 4), tl.float32)
    ssq = tl.zeros((G, WPB), tl.float32)
    xoff = (tl.arange(0, G)[:, None, None] * WPB + tl.arange(0, WPB)[None, :, None]) * 8 \
        + tl.arange(0, 8)[None, None, :]                                             # (G, B/8, 8)
    for g0 in range(gstart, gend, G):
        if PFW and PF > 1:  # the window's next step
            pf0 = g0 + PF * G
            pf1 = tl.minimum(pf0 + G, gend)
            _prefetch_blocks(w_ptr, s_ptr, z_ptr, pid * R4, N4, NB, pf0, pf1, R4, WPB, ENC)
            if SILU:
                _prefetch_blocks(w_ptr, s_ptr, z_ptr, pid * R4 + N4, N4 * 2, NB, pf0, pf1, R4, WPB, ENC)
        w_n, s_n, z_n = _load_step(w_ptr, s_ptr, z_ptr, woff, soff, g0 + AHEAD, gend, B, G, ENC)
        if SILU:
            wu_n, su_n, zu_n = _load_step(w_ptr, s_ptr, z_ptr, uoff, usoff, g0 + AHEAD, gend, B, G, ENC)
        kk = g0 * B + xoff
        xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)          # (G, B/8, 8)
        if NORM:
            ssq += tl.sum(xv * xv, axis=2)
            xv = xv * tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xv)                                # (G, B/8) each
        xs = (x0 + x2 + x4 + x6) + (x1 + x3 + x5 + x7)
        acc = _rows_dot(acc, w, s, z, x0[None, :, :, None], x1[None, :, :, None], x2[None, :, :, None],
                        x3[None, :, :, None], x4[None, :, :, None], x5[None, :, :, None],
                        x6[None, :, :, None], x7[None, :, :, None], xs[None, :, :, None], ENC, ASM)
        if SILU:
            acc_u = _rows_dot(acc_u, wu, su, zu, x0[None, :, :, None], x1[None, :, :, None],
                              x2[None, :, :, None], x3[None, :, :, None], x4[None, :, :, None],
                              x5[None, :, :, None], x6[None, :, :, None], x7[None, :, :, None],
                              xs[None, :, :, None], ENC, ASM)
            if DEEP:
                wu, su, zu = wu1, su1, zu1
                wu1, su1, zu1 = wu_n, su_n, zu_n
            else:
                wu, su, zu = wu_n, su_n, zu_n
        if DEEP:
            w, s, z = w1, s1, z1
            w1, s1, z1 = w_n, s_n, z_n
        else:
            w, s, z = w_n, s_n, z_n
    out = tl.sum(tl.sum(acc, axis=2), axis=1)                                         # (R4, 4)
    if SILU:
        up = tl.sum(tl.sum(acc_u, axis=2), axis=1)
    else:
        up = out  # unused
    ssq_t = tl.sum(tl.sum(ssq, axis=1), axis=0)
    rows = rg[:, None] * 4 + tl.arange(0, 4)[None, :]                                 # (R4, 4)
    if SPLIT == 1:
        if ROPE:
            _rope_epilogue(out, ssq_t, rows, pid, K, eps, bias_ptr, y_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr,
                           NH, NKV, S, HAS_BIAS, NORM, ROPE, INTERPRET)
        else:
            _il4_epilogue(out, up, ssq_t, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS, SILU, NORM,
                          HAS_RES, INTERPRET)
    else:
        # partials [program, split, PW]: the R4 x 4 gate (or only) sums, the R4 x 4 up sums, the sum of x^2
        PW: tl.constexpr = 8 * R4 + 1
        loc = tl.arange(0, R4)[:, None] * 4 + tl.arange(0, 4)[None, :]                # (R4, 4)
        pp = part_ptr + pid * (SPLIT * PW)
        mine = pp + tl.program_id(1) * PW
        tl.store(mine + loc, out)
        if SILU:
            tl.store(mine + 4 * R4 + loc, up)
        if NORM:
            tl.store(mine + 8 * R4, ssq_t)
        tl.debug_barrier()  # every thread's partials before the counter's release
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:  # the last program of this row group: the sum of the partials, the epilogue
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
            tot = tl.zeros((R4, 4), tl.float32)
            utot = tl.zeros((R4, 4), tl.float32)
            ssq_t = 0.0
            for sp in tl.static_range(SPLIT):  # in split order: the sum does not depend on who came last
                tot += tl.load(pp + sp * PW + loc, cache_modifier=".cg")
                if SILU:
                    utot += tl.load(pp + sp * PW + 4 * R4 + loc, cache_modifier=".cg")
                if NORM:
                    ssq_t += tl.load(pp + sp * PW + 8 * R4, cache_modifier=".cg")
            if ROPE:
                _rope_epilogue(tot, ssq_t, rows, pid, K, eps, bias_ptr, y_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr,
                               vc_ptr, NH, NKV, S, HAS_BIAS, NORM, ROPE, INTERPRET)
            else:
                _il4_epilogue(tot, utot, ssq_t, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS, SILU,
                              NORM, HAS_RES, INTERPRET)


@triton.jit
def _il4_epilogue(out, up, ssq, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS: tl.constexpr,
                  SILU: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, INTERPRET: tl.constexpr):
    """out, up (R4, 4) float32 sums of rows `rows` (R4, 4), ssq the sum of x^2 over K -> y: * rsqrt(mean(x^2)
    + eps) with NORM, + bias, silu(out) * up with SILU, + residual."""
    rmask = rows < N_OUT
    if NORM:
        rstd = tl.rsqrt(ssq / K + eps)
        out = out * rstd
        up = up * rstd
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if SILU:
        out = out / (1.0 + tl.exp(-out)) * up
    if HAS_RES:
        out += tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, cast(out, y_ptr.dtype.element_ty, INTERPRET), mask=rmask)


@triton.jit
def _rope_epilogue(out, ssq, rows, pid, K, eps, bias_ptr, q_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, NH, NKV,
                   S, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HD: tl.constexpr, INTERPRET: tl.constexpr):
    """out (2, 4) float32 sums of rows `rows` = (i, i + HD/2) x 4 of head h = pid // (HD/8) -> * rsqrt(mean(x^2) +
    eps) with NORM, + bias; then, as rope_cache_kernel does (rotate half): q heads (h < NH) rotated into q (NH,
    HD), k heads rotated and v heads as they are into their cache rows at the position."""
    if NORM:
        out = out * tl.rsqrt(ssq / K + eps)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows).to(tl.float32)
    first = (tl.arange(0, 2) == 0)[:, None]
    x1 = tl.sum(tl.where(first, out, 0.0), axis=0)  # (4,): dims d of the head
    x2 = tl.sum(tl.where(first, 0.0, out), axis=0)  # dims d + HD/2
    HALF: tl.constexpr = HD // 8
    h = pid // HALF
    d = (pid % HALF) * 4 + tl.arange(0, 4)
    pos = tl.load(pos_ptr)
    if h < NH + NKV:
        o1, o2 = rotate_half(x1, x2, cos_ptr, sin_ptr, pos, d, HD)
        if h < NH:
            dst = q_ptr + h * HD
        else:
            dst = kc_ptr + ((h - NH) * S + pos) * HD
    else:
        o1 = x1
        o2 = x2
        dst = vc_ptr + ((h - NH - NKV) * S + pos) * HD
    tl.store(dst + d, cast(o1, dst.dtype.element_ty, INTERPRET))
    tl.store(dst + HD // 2 + d, cast(o2, dst.dtype.element_ty, INTERPRET))
