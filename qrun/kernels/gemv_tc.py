"""Decode GEMV (M = 1) on the tensor cores: y (N,) = dequant(W) (N, K) @ x (K,) for int4_sym / int4_asym in the
"tc16" layout (layout.py), bf16 or fp16 activations.

Why: the il4 GEMV (gemv_il.py) spends ~145 SASS instructions per 16 bytes of weights at 4 rows a program
(8 PRMT + 8 FFMA a word, plus x's conversions and sums), so at the copy bandwidth it would need ~90% of the
issue slots; ncu saw 0.49 issues a cycle and 49% of copy on 7B qkv. Here an mma.m16n8k16 does the multiply-adds
of 256 weights (one int32 word per lane), and a word costs 8 integer instructions to become its lane's A
fragment: PRMT spreads two bytes into the two 16-bit halves, LOP3 keeps a nibble under the exponent of 128
(bf16 0x4300 | u = 128 + u, exact; fp16 0x6400 | u = 1024 + u) and flips the sign bit of int4_sym's two's
complement nibble in the same instruction, SHR brings the high nibbles down. x is the B operand, the same
column 8 times, so every lane's C fragment holds its two rows' sums. The common offset is taken off with a
second mma of an all-ones A against the same B, which gives sum(x) over the chunk:
    sum_k q_k x_k = D - off * E,  off = 136 (bf16, sym) or 128 + z (asym); 1032 / 1024 + z with fp16.

Program: one tile of 16 output rows (SILU: and the matching 16 up rows), WARPS warps splitting K by quads of 64
k (warp w takes quads w, w + WARPS, ...; with SPLIT programs a tile, program s's warp w takes s WARPS + w, then
every WARPS SPLIT quads, and the last to finish adds up the partials). Every tensor is 1-D of WARPS * 32
elements, one per thread, the layout Triton gives a 1-D tensor of that size; element i is lane i % 32 of warp
i // 32, which the mma's fragment positions rely on (the GPU tests would fail otherwise). A lane's words, x
pairs and scales are each loaded as such a tensor, 4 bytes a lane: each warp load instruction reads 128
contiguous bytes.
Under TRITON_INTERPRET=1 (no inline asm) `_mma_ref` computes the same sums with tensor ops.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .dequant import cast
from .pdl import pdl_enter


def _mma_asm(f16: bool, sym: bool) -> str:
    """PTX of one step of one tile: 4 chunks of 16 k (words $2..$5, x pairs $6..$13), then
    acc_lo += s_lo * (D[r] - off_lo * E), acc_hi += s_hi * (D[r + 8] - off_hi * E)."""
    ty = "f16" if f16 else "bf16"
    magic = 0x6400 if f16 else 0x4300
    if sym:
        magic |= 0x0008  # LOP3 0x6A below: bits under the mask are XORed with c, so bit 3 flips (n ^ 8)
    one = 0x3C00 if f16 else 0x3F80
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
    s = ("{ .reg .b32 z, m, c, one, t0, t1, h0, h1, a0, a1, a2, a3, b0, b1; .reg .f32 d0, d1, d2, d3, e0, e1, e2, "
         "e3, f, g, nl, nh; "
         f"mov.b32 z, 0; mov.b32 m, 0x000F000F; mov.b32 c, {magic | magic << 16:#x}; "
         f"mov.b32 one, {one | one << 16:#x}; "
         "mov.f32 d0, 0f00000000; mov.f32 d1, 0f00000000; mov.f32 d2, 0f00000000; mov.f32 d3, 0f00000000; "
         "mov.f32 e0, 0f00000000; mov.f32 e1, 0f00000000; mov.f32 e2, 0f00000000; mov.f32 e3, 0f00000000; ")
    for j in range(4):
        w, xa, xb = f"${2 + j}", f"${6 + 2 * j}", f"${7 + 2 * j}"
        s += (f"prmt.b32 t0, {w}, z, 0x4140; prmt.b32 t1, {w}, z, 0x4342; shr.u32 h0, t0, 4; shr.u32 h1, t1, 4; "
              # (b ? a ^ c : c): the nibble (XORed with 8 for sym) under the magic exponent
              "lop3.b32 a0, t0, m, c, 0x6A; lop3.b32 a1, t1, m, c, 0x6A; "
              "lop3.b32 a2, h0, m, c, 0x6A; lop3.b32 a3, h1, m, c, 0x6A; "
              f"prmt.b32 b0, {xa}, {xb}, 0x5410; prmt.b32 b1, {xa}, {xb}, 0x7632; "
              f"{mma} {{d0, d1, d2, d3}}, {{a0, a1, a2, a3}}, {{b0, b1}}, {{d0, d1, d2, d3}}; "
              f"{mma} {{e0, e1, e2, e3}}, {{one, one, one, one}}, {{b0, b1}}, {{e0, e1, e2, e3}}; ")
    s += ("neg.f32 nl, $16; neg.f32 nh, $17; fma.rn.f32 f, nl, e0, d0; fma.rn.f32 g, nh, e0, d2; "
          "fma.rn.f32 $0, $14, f, $18; fma.rn.f32 $1, $15, g, $19; }")
    return s


ASM_BF16_SYM = tl.constexpr(_mma_asm(False, True))
ASM_BF16_ASYM = tl.constexpr(_mma_asm(False, False))
ASM_F16_SYM = tl.constexpr(_mma_asm(True, True))
ASM_F16_ASYM = tl.constexpr(_mma_asm(True, False))


@triton.jit
def _bits16(v, F16: tl.constexpr):
    """int32 tensor of 16-bit float patterns (low bits) -> float32."""
    if F16:
        return (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (v << 16).to(tl.float32, bitcast=True)


@triton.jit
def _mma_ref(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, s_lo, s_hi, o_lo, o_hi, acc_lo, acc_hi,
             WARPS: tl.constexpr, F16: tl.constexpr, SYM: tl.constexpr):
    """What the asm computes, from tensor ops (the interpreter): lane (r, c) of a warp gets the sums of rows r
    and r + 8 over the 64 k of the step, all 4 lanes c of a row the same."""
    base = 1024.0 if F16 else 128.0
    d_lo = tl.zeros((WARPS, 8, 4), tl.float32)
    d_hi = tl.zeros((WARPS, 8, 4), tl.float32)
    e = tl.zeros((WARPS, 8, 4), tl.float32)
    for j in tl.static_range(4):
        w = (w0, w1, w2, w3)[j]
        xa = (x0, x2, x4, x6)[j]
        xb = (x1, x3, x5, x7)[j]
        xk0 = tl.reshape(_bits16(xa, F16), (WARPS, 8, 4))        # x[k0], x[k0 + 1], x[k0 + 2], x[k0 + 3]
        xk1 = tl.reshape(_bits16(xa >> 16, F16), (WARPS, 8, 4))
        xk2 = tl.reshape(_bits16(xb, F16), (WARPS, 8, 4))
        xk3 = tl.reshape(_bits16(xb >> 16, F16), (WARPS, 8, 4))
        w = tl.reshape(w, (WARPS, 8, 4))
        u = []
        for i in tl.static_range(8):  # nibble i of the word: byte i // 2, low or high
            n = (w >> (4 * i)) & 0xF
            if SYM:
                n = n ^ 8
            u.append(n.to(tl.float32) + base)
        d_lo += u[0] * xk0 + u[1] * xk1 + u[2] * xk2 + u[3] * xk3
        d_hi += u[4] * xk0 + u[5] * xk1 + u[6] * xk2 + u[7] * xk3
        e += xk0 + xk1 + xk2 + xk3
    # sum over the 4 lanes c of a row (the mma's K reduction), broadcast back to every lane
    d_lo = tl.broadcast_to(tl.sum(d_lo, axis=2)[:, :, None], (WARPS, 8, 4))
    d_hi = tl.broadcast_to(tl.sum(d_hi, axis=2)[:, :, None], (WARPS, 8, 4))
    e = tl.broadcast_to(tl.sum(e, axis=2)[:, :, None], (WARPS, 8, 4))
    d_lo = tl.reshape(d_lo, (WARPS * 32,))
    d_hi = tl.reshape(d_hi, (WARPS * 32,))
    e = tl.reshape(e, (WARPS * 32,))
    return acc_lo + s_lo * (d_lo - o_lo * e), acc_hi + s_hi * (d_hi - o_hi * e)


@triton.jit
def _mma_step(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, s_lo, s_hi, o_lo, o_hi, acc_lo, acc_hi,
              WARPS: tl.constexpr, F16: tl.constexpr, SYM: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:
        return _mma_ref(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, s_lo, s_hi, o_lo, o_hi, acc_lo, acc_hi,
                        WARPS, F16, SYM)
    if F16:
        asm: tl.constexpr = ASM_F16_SYM if SYM else ASM_F16_ASYM
    else:
        asm: tl.constexpr = ASM_BF16_SYM if SYM else ASM_BF16_ASYM
    return tl.inline_asm_elementwise(
        asm, "=f,=f" + ",r" * 12 + ",f" * 6,
        [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, s_lo, s_hi, o_lo, o_hi, acc_lo, acc_hi],
        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _load_w(w_ptr, wb, q, NQ, CG: tl.constexpr):
    """The 4 words (chunks j) of quad q of the tile at word offset wb (+ lane): (T,) int32 each. Past the last
    quad the last one is read again (no mask, no zero fill): its scales are masked to 0 instead.
    CG: cached in L2 only, so the weight stream does not evict x from L1."""
    p = w_ptr + wb + tl.minimum(q, NQ - 1) * 128
    if CG:
        return (tl.load(p, cache_modifier=".cg"), tl.load(p + 32, cache_modifier=".cg"),
                tl.load(p + 64, cache_modifier=".cg"), tl.load(p + 96, cache_modifier=".cg"))
    return tl.load(p), tl.load(p + 32), tl.load(p + 64), tl.load(p + 96)


@triton.jit
def _load_s(s_ptr, z_ptr, sb, q, NQ, B: tl.constexpr, ENC: tl.constexpr, F16: tl.constexpr):
    """Scales of rows r and r + 8 of the tile for quad q's block, and the offsets to take off (T,) float32."""
    m = q < NQ
    p = sb + (q // (B // 64)) * 16
    s_lo = tl.load(s_ptr + p, mask=m, other=0.0).to(tl.float32)
    s_hi = tl.load(s_ptr + p + 8, mask=m, other=0.0).to(tl.float32)
    base = 1024.0 if F16 else 128.0
    if ENC == "int4_asym":
        o_lo = tl.load(z_ptr + p, mask=m, other=0).to(tl.float32) + base
        o_hi = tl.load(z_ptr + p + 8, mask=m, other=0).to(tl.float32) + base
    else:
        o_lo = tl.zeros_like(s_lo) + (base + 8.0)
        o_hi = o_lo
    return s_lo, s_hi, o_lo, o_hi


@triton.jit
def _load_x(x32_ptr, xb, q, NQ, K2, KFULL: tl.constexpr):
    """Lane (r, c)'s x of quad q as int32 pairs: x[k0 .. k0 + 3] for the chunks j = 0..3, k0 = 64 q + 16 c + 4 j
    (pairs k0 / 2 and k0 / 2 + 1). KFULL (K = Kp): no mask, past the last quad the last is read again (its
    scales are 0); else zero past K."""
    p = tl.minimum(q, NQ - 1) * 32 + xb
    if KFULL:
        return (tl.load(x32_ptr + p), tl.load(x32_ptr + p + 1), tl.load(x32_ptr + p + 2), tl.load(x32_ptr + p + 3),
                tl.load(x32_ptr + p + 4), tl.load(x32_ptr + p + 5), tl.load(x32_ptr + p + 6),
                tl.load(x32_ptr + p + 7))
    return (tl.load(x32_ptr + p, mask=p < K2, other=0), tl.load(x32_ptr + p + 1, mask=p + 1 < K2, other=0),
            tl.load(x32_ptr + p + 2, mask=p + 2 < K2, other=0), tl.load(x32_ptr + p + 3, mask=p + 3 < K2, other=0),
            tl.load(x32_ptr + p + 4, mask=p + 4 < K2, other=0), tl.load(x32_ptr + p + 5, mask=p + 5 < K2, other=0),
            tl.load(x32_ptr + p + 6, mask=p + 6 < K2, other=0), tl.load(x32_ptr + p + 7, mask=p + 7 < K2, other=0))


@triton.jit
def gemv_tc16_kernel(
    # pointers: x (K,) as int32 pairs, words (N/16, NQ, 4, 32) int32, scales and zeros (N/16, NB, 16) (zeros or
    # dummy), bias (N_OUT,) or dummy, residual (N_OUT,) or dummy, y (N_OUT,)
    # SPLIT > 1: partials (N/16 tiles, SPLIT, 2 halves, 16 rows) float32 and arrival counters (N/16,) int32,
    # zero between launches (dummies otherwise)
    x32_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, y_ptr, part_ptr, cnt_ptr,
    N_OUT, K, NB, NQ,
    ENC: tl.constexpr, B: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_RES: tl.constexpr,
    F16: tl.constexpr, KFULL: tl.constexpr, WARPS: tl.constexpr, DEEP: tl.constexpr = False,
    CG: tl.constexpr = False, SPLIT: tl.constexpr = 1, PDL: tl.constexpr = False,
    INTERPRET: tl.constexpr = False,
):
    """Program (p, s): output rows 16 p .. 16 p + 15 (SILU: and up rows N_OUT + 16 p ..; y = silu(gate) * up),
    over the quads s WARPS + w, (s + SPLIT) WARPS + w, ... of its warps w.
    KFULL: K = Kp (= 64 NQ), x needs no mask. DEEP: weights and x two steps ahead instead of one. CG: weights
    bypass L1. SPLIT: programs per tile along K, for short-N shapes that have fewer tiles than SMs (Qwen2-0.5B:
    56): each stores its partial sums, and the last of a tile to arrive (an acq_rel counter, as in
    rope_attention_kernel) adds them up, does the epilogue and resets the counter. PDL: the first step's
    weights are loaded before waiting on the previous kernel (pdl.py); x only after."""
    SYM: tl.constexpr = ENC == "int4_sym"
    T: tl.constexpr = WARPS * 32
    STRIDE: tl.constexpr = WARPS * SPLIT  # quads between a warp's steps
    i = tl.arange(0, T)
    lane = i % 32
    tile = tl.program_id(0)
    q = tl.program_id(1) * WARPS + i // 32  # this warp's first quad
    wb = tile * (NQ * 128) + lane
    sb = tile * (NB * 16) + lane // 4
    xb = (lane % 4) * 8
    K2 = K // 2
    w0, w1, w2, w3 = _load_w(w_ptr, wb, q, NQ, CG)
    s_lo, s_hi, o_lo, o_hi = _load_s(s_ptr, z_ptr, sb, q, NQ, B, ENC, F16)
    if SILU:
        ub = wb + (N_OUT // 16) * (NQ * 128)
        usb = sb + (N_OUT // 16) * (NB * 16)
        u0, u1, u2, u3 = _load_w(w_ptr, ub, q, NQ, CG)
        us_lo, us_hi, uo_lo, uo_hi = _load_s(s_ptr, z_ptr, usb, q, NQ, B, ENC, F16)
    if DEEP:  # the second step's weights too, before waiting
        v0, v1, v2, v3 = _load_w(w_ptr, wb, q + STRIDE, NQ, CG)
        vs_lo, vs_hi, vo_lo, vo_hi = _load_s(s_ptr, z_ptr, sb, q + STRIDE, NQ, B, ENC, F16)
        if SILU:
            uv0, uv1, uv2, uv3 = _load_w(w_ptr, ub, q + STRIDE, NQ, CG)
            uvs_lo, uvs_hi, uvo_lo, uvo_hi = _load_s(s_ptr, z_ptr, usb, q + STRIDE, NQ, B, ENC, F16)
    AHEAD: tl.constexpr = 2 * STRIDE if DEEP else STRIDE
    if PDL:
        pdl_enter(PDL)
    x0, x1, x2, x3, x4, x5, x6, x7 = _load_x(x32_ptr, xb, q, NQ, K2, KFULL)
    if DEEP:  # x two steps ahead as well: its L2 latency under the weight stream is what one step ahead left
        v_x0, v_x1, v_x2, v_x3, v_x4, v_x5, v_x6, v_x7 = _load_x(x32_ptr, xb, q + STRIDE, NQ, K2, KFULL)
    acc_lo = tl.zeros((T,), tl.float32)
    acc_hi = tl.zeros((T,), tl.float32)
    if SILU:
        uacc_lo = tl.zeros((T,), tl.float32)
        uacc_hi = tl.zeros((T,), tl.float32)
    for _ in range(0, tl.cdiv(NQ, STRIDE)):
        n0, n1, n2, n3 = _load_w(w_ptr, wb, q + AHEAD, NQ, CG)
        ns_lo, ns_hi, no_lo, no_hi = _load_s(s_ptr, z_ptr, sb, q + AHEAD, NQ, B, ENC, F16)
        if SILU:
            un0, un1, un2, un3 = _load_w(w_ptr, ub, q + AHEAD, NQ, CG)
            uns_lo, uns_hi, uno_lo, uno_hi = _load_s(s_ptr, z_ptr, usb, q + AHEAD, NQ, B, ENC, F16)
        y0, y1, y2, y3, y4, y5, y6, y7 = _load_x(x32_ptr, xb, q + AHEAD, NQ, K2, KFULL)
        acc_lo, acc_hi = _mma_step(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, s_lo, s_hi, o_lo, o_hi,
                                   acc_lo, acc_hi, WARPS, F16, SYM, INTERPRET)
        if SILU:
            uacc_lo, uacc_hi = _mma_step(u0, u1, u2, u3, x0, x1, x2, x3, x4, x5, x6, x7, us_lo, us_hi, uo_lo,
                                         uo_hi, uacc_lo, uacc_hi, WARPS, F16, SYM, INTERPRET)
            if DEEP:
                u0, u1, u2, u3, us_lo, us_hi, uo_lo, uo_hi = uv0, uv1, uv2, uv3, uvs_lo, uvs_hi, uvo_lo, uvo_hi
                uv0, uv1, uv2, uv3, uvs_lo, uvs_hi, uvo_lo, uvo_hi = un0, un1, un2, un3, uns_lo, uns_hi, uno_lo, \
                    uno_hi
            else:
                u0, u1, u2, u3, us_lo, us_hi, uo_lo, uo_hi = un0, un1, un2, un3, uns_lo, uns_hi, uno_lo, uno_hi
        if DEEP:
            w0, w1, w2, w3, s_lo, s_hi, o_lo, o_hi = v0, v1, v2, v3, vs_lo, vs_hi, vo_lo, vo_hi
            v0, v1, v2, v3, vs_lo, vs_hi, vo_lo, vo_hi = n0, n1, n2, n3, ns_lo, ns_hi, no_lo, no_hi
        else:
            w0, w1, w2, w3, s_lo, s_hi, o_lo, o_hi = n0, n1, n2, n3, ns_lo, ns_hi, no_lo, no_hi
        if DEEP:
            x0, x1, x2, x3, x4, x5, x6, x7 = v_x0, v_x1, v_x2, v_x3, v_x4, v_x5, v_x6, v_x7
            v_x0, v_x1, v_x2, v_x3, v_x4, v_x5, v_x6, v_x7 = y0, y1, y2, y3, y4, y5, y6, y7
        else:
            x0, x1, x2, x3, x4, x5, x6, x7 = y0, y1, y2, y3, y4, y5, y6, y7
        q += STRIDE
    # the warps' K shares summed per lane; lane (r, c) then holds rows r and r + 8 (the 4 lanes c alike)
    lo = tl.sum(tl.reshape(acc_lo, (WARPS, 32)), axis=0)                              # (32,)
    hi = tl.sum(tl.reshape(acc_hi, (WARPS, 32)), axis=0)
    ln = tl.arange(0, 32)
    rows = tl.join(tile * 16 + ln // 4, tile * 16 + ln // 4 + 8)                      # (32, 2)
    out = tl.join(lo, hi)
    smask = (ln % 4 == 0)[:, None] & (rows < N_OUT)
    if SILU:
        up = tl.join(tl.sum(tl.reshape(uacc_lo, (WARPS, 32)), axis=0),
                     tl.sum(tl.reshape(uacc_hi, (WARPS, 32)), axis=0))
    else:
        up = out  # unused
    if SPLIT == 1:
        _tc16_epilogue(out, up, rows, smask, bias_ptr, res_ptr, y_ptr, HAS_BIAS, SILU, HAS_RES, INTERPRET)
    else:
        # partial [tile, split, half, row in tile]: half 0 the gate (or only) rows, half 1 the up rows
        pp = part_ptr + (tile * SPLIT) * 32 + (rows - tile * 16)                       # (32, 2)
        tl.store(pp + tl.program_id(1) * 32, out, mask=smask)
        if SILU:
            tl.store(pp + tl.program_id(1) * 32 + 16, up, mask=smask)
        tl.debug_barrier()  # every thread's partials before the counter's release
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:  # the last program of this tile: the sum of the SPLIT partials, the epilogue
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
            tot = tl.zeros((32, 2), tl.float32)
            utot = tl.zeros((32, 2), tl.float32)
            for sp in tl.static_range(SPLIT):  # in split order: the sum does not depend on who came last
                tot += tl.load(pp + sp * 32, mask=smask, other=0.0, cache_modifier=".cg")
                if SILU:
                    utot += tl.load(pp + sp * 32 + 16, mask=smask, other=0.0, cache_modifier=".cg")
            _tc16_epilogue(tot, utot, rows, smask, bias_ptr, res_ptr, y_ptr, HAS_BIAS, SILU, HAS_RES, INTERPRET)


@triton.jit
def _tc16_epilogue(out, up, rows, smask, bias_ptr, res_ptr, y_ptr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                   HAS_RES: tl.constexpr, INTERPRET: tl.constexpr):
    """out, up (32, 2) float32 sums of rows `rows` -> y: + bias, silu(out) * up, + residual."""
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=smask, other=0.0).to(tl.float32)
    if SILU:
        out = out / (1.0 + tl.exp(-out)) * up
    if HAS_RES:
        out += tl.load(res_ptr + rows, mask=smask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, cast(out, y_ptr.dtype.element_ty, INTERPRET), mask=smask)
