"""Decode GEMV (M = 1) on the tensor cores, reading the "il4" layout itself: y (N,) = dequant(W) (N, K) @ x (K,)
for int4_sym / int4_asym with quantization blocks of 128, bf16 or fp16 activations. Written in Gluon.

Why: the il4 GEMV (gemv_il.py) is bound by issuing instructions at M = 1. Per int32 word of 8 weights it runs 8
PRMT + 8 FFMA + ~5 more, and with no loads at all its arithmetic alone takes as long as the whole kernel on 7B
gate+up and down (docs/PERF.md attempt 76). Here an mma.m16n8k16 does the multiply-adds, and a word costs 7
integer instructions to become a quarter of its lane's A fragment, plus a quarter of an HMMA:

    e = (w & 0x0F0F0F0F) ^ f, o = ((w >> 4) & 0x0F0F0F0F) ^ f     (f = 0x08080808 for int4_sym: q -> q + 8)
    PRMT e or o with 0x43 bytes -> bf16 pairs 0x43nn = 128 + u (fp16: 0x64nn = 1024 + u), exact

The common offset is taken off with sum(x) over the block, from a second mma of an all-ones A against the same
B: sum_k q_k x_k = D - (128 + zero) E (zero 8 for sym; 1024 + zero with fp16).

The lanes and the fragments. The layout stays il4 (the prefill GEMM reads it), and the mma's k order is ours to
choose as long as A and B agree. Lane (g, c) of a warp (g = lane // 4, c = lane % 4) takes row group rg + g
(rows 4 (rg + g) + j, j = 0..3) and, of a quantization block of 128 k (16 words a row), words 4 s + c, s = 0..3
(chunk s: 4 rows x 8 k, one 16-byte load; the 4 lanes of a row group read 64 contiguous bytes per load, whole
sectors, and the warp 8 row groups, 32 rows). Chunk s of lane c is 8 k, whose word j
gives row j's even nibbles e = (n0, n2, n4, n6) and odd ones o = (n1, n3, n5, n7). One mma takes rows j0 = 0 (or
2) as its row g and j1 = 1 (or 3) as its row g + 8, and half h of the chunk:

    a0 = row j0 (n0, n2) | a1 = row j1 (n0, n2) | a2 = row j0 (n1, n3) | a3 = row j1 (n1, n3)      (h = 0)
    b0 = x (k0, k2)      | b1 = x (k1, k3)                                                         (n4.. for h = 1)

so each mma's 16 k are the 4 lanes c' 4 k, all inside one block, and its D holds rows j0 and j1 summed over
them, the same in every column (x is each of B's 8 columns) and in every lane of the row group. x is staged
once per program in shared memory as bf16 (or fp16) pairs in that order, (k0, k2), (k1, k3), (k4, k6), (k5,
k7), normalized by the RMSNorm weight on the way when NORM (the sum of x^2 taken then too), so a lane's B
fragments are four 16-byte shared loads a block. Per block of 16 words a lane runs 193 SASS instructions (112
integer for the nibbles, 16 + 8 HMMA, the scale, loads and the loop; offline SASS, triton 3.6): ~12 a word against
the il4 GEMV's ~21. On the H100 that made 7B qkv and o ~15% faster and down ~3%; gate+up stays faster on il4
(docs/PERF.md attempt 78).

Program (pid, sp): row groups 8 pid .. 8 pid + 7 (SILU: and the up rows' groups + N_OUT / 4), blocks sp NBS ..
(sp + 1) NBS - 1 of K; warp w takes the program's blocks w, w + W, ... and the warps' sums are added at the
end. With SPLIT > 1 programs a row set, each stores its partial sums (and its part of sum(x^2)) and the last to
arrive (an acq_rel counter, gemv_il's pattern) adds them in split order and does the epilogue. AHEAD: blocks of
weights loaded ahead of the one computed (the first AHEAD before the PDL wait, pdl.py).

Limits (ops._mma_ok): il4 int4 with blocks of 128, bf16 or fp16 x, sm_90 (the one GPU it is tested on). Gluon has
no interpreter: the GPU tests run it, tests/test_compile_sm90.py compiles it on the CPU, and
tests/test_gemv_mma_map.py checks the fragment map above with torch.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .gemm_wg import _cta_barrier, _reinterpret_name


def step_asm(f16: bool, sym: bool, with_e: bool) -> str:
    """PTX of one block of one lane: 16 words ($16.. : chunk s word j at 4 s + j) and 16 x pairs ($32.. : chunk s
    pair i at 4 s + i) in; out $0..$3 the sums over the block of rows j = 0..3 of sum (off + u) x, $4 (with_e) the
    sum of x. pack = 16: one asm instance takes a thread's 16 words and 16 pairs; outputs $5..$15 are unused."""
    ty = "f16" if f16 else "bf16"
    magic = 0x64646464 if f16 else 0x43434343
    one = 0x3C003C00 if f16 else 0x3F803F80
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
    s = ("{ .reg .b32 k, m, f, one, e, o, t, a<16>; .reg .f32 p<4>, q<4>, r<4>; "
         f"mov.b32 k, {magic:#x}; mov.b32 m, 0x0F0F0F0F; mov.b32 f, {0x08080808 if sym else 0:#x}; "
         f"mov.b32 one, {one:#x}; "
         "mov.f32 p0, 0f00000000; mov.f32 p1, 0f00000000; mov.f32 p2, 0f00000000; mov.f32 p3, 0f00000000; "
         "mov.f32 q0, 0f00000000; mov.f32 q1, 0f00000000; mov.f32 q2, 0f00000000; mov.f32 q3, 0f00000000; "
         "mov.f32 r0, 0f00000000; mov.f32 r1, 0f00000000; mov.f32 r2, 0f00000000; mov.f32 r3, 0f00000000; ")
    for c in range(4):
        for j in range(4):
            w = f"${16 + 4 * c + j}"
            # (w & m) ^ f: lop3 0x6A with a = w (0xF0), b = m (0xCC), c = f (0xAA)
            s += (f"lop3.b32 e, {w}, m, f, 0x6A; shr.u32 t, {w}, 4; lop3.b32 o, t, m, f, 0x6A; "
                  f"prmt.b32 a{4 * j}, e, k, 0x4140; prmt.b32 a{4 * j + 1}, o, k, 0x4140; "
                  f"prmt.b32 a{4 * j + 2}, e, k, 0x4342; prmt.b32 a{4 * j + 3}, o, k, 0x4342; ")
        x0, x1, x2, x3 = (f"${32 + 4 * c + i}" for i in range(4))
        for h, (b0, b1) in enumerate(((x0, x1), (x2, x3))):
            for acc, j0 in (("p", 0), ("q", 2)):  # rows (j0, j0 + 1)
                a = (f"a{4 * j0 + 2 * h}", f"a{4 * j0 + 4 + 2 * h}", f"a{4 * j0 + 2 * h + 1}",
                     f"a{4 * j0 + 4 + 2 * h + 1}")
                s += (f"{mma} {{{acc}0, {acc}1, {acc}2, {acc}3}}, {{{', '.join(a)}}}, {{{b0}, {b1}}}, "
                      f"{{{acc}0, {acc}1, {acc}2, {acc}3}}; ")
            if with_e:
                s += f"{mma} {{r0, r1, r2, r3}}, {{one, one, one, one}}, {{{b0}, {b1}}}, {{r0, r1, r2, r3}}; "
    s += "mov.f32 $0, p0; mov.f32 $1, p2; mov.f32 $2, q0; mov.f32 $3, q2; "
    if with_e:
        s += "mov.f32 $4, r0; "
    return s + "}"


# one constexpr a variant (a jit function reads globals only as constexprs): bf16 / fp16, asym / sym, with E or not
STEP_B_A = gl.constexpr(step_asm(False, False, False))
STEP_B_AE = gl.constexpr(step_asm(False, False, True))
STEP_B_S = gl.constexpr(step_asm(False, True, False))
STEP_B_SE = gl.constexpr(step_asm(False, True, True))
STEP_H_A = gl.constexpr(step_asm(True, False, False))
STEP_H_AE = gl.constexpr(step_asm(True, False, True))
STEP_H_S = gl.constexpr(step_asm(True, True, False))
STEP_H_SE = gl.constexpr(step_asm(True, True, True))
STEP_CONSTRAINTS = gl.constexpr("=f" + ",=f" * 15 + ",r" * 32)


@gluon.jit
def _first5(v):
    """[..., 16] -> its elements 0..4 (in-thread: the splits rename registers)."""
    S0: gl.constexpr = v.shape[0]
    S1: gl.constexpr = v.shape[1]
    S2: gl.constexpr = v.shape[2]
    t = gl.reshape(v, [S0, S1, S2, 2, 2, 2, 2])  # index 8 a + 4 b + 2 c + d
    d0, d1 = gl.split(t)
    c00, c01 = gl.split(d0)  # d = 0: c = 0, 1
    c10, c11 = gl.split(d1)
    v0 = gl.split(gl.split(c00)[0])[0]    # d = 0, c = 0, b = 0, a = 0: index 0
    v4 = gl.split(gl.split(c00)[1])[0]    # d = 0, c = 0, b = 1, a = 0: index 4
    v1 = gl.split(gl.split(c10)[0])[0]    # d = 1, c = 0: index 1
    v2 = gl.split(gl.split(c01)[0])[0]    # d = 0, c = 1: index 2
    v3 = gl.split(gl.split(c11)[0])[0]    # d = 1, c = 1: index 3
    return v0, v1, v2, v3, v4


@gluon.jit
def _split4(v):
    """[..., 4] -> its 4 elements."""
    S0: gl.constexpr = v.shape[0]
    S1: gl.constexpr = v.shape[1]
    S2: gl.constexpr = v.shape[2]
    t = gl.reshape(v, [S0, S1, S2, 2, 2])  # index 2 a + b
    b0, b1 = gl.split(t)
    v0, v2 = gl.split(b0)
    v1, v3 = gl.split(b1)
    return v0, v1, v2, v3


@gluon.jit
def _step(w, xq, F16: gl.constexpr, SYM: gl.constexpr, WITH_E: gl.constexpr, L3: gl.constexpr):
    """w [W, 8, 4, 16] int32 words, xq [W, 8, 4, 16] int32 x pairs -> (D_0..D_3, E) [W, 8, 4] float32 in L3."""
    if F16:
        if SYM:
            asm: gl.constexpr = STEP_H_SE if WITH_E else STEP_H_S
        else:
            asm: gl.constexpr = STEP_H_AE if WITH_E else STEP_H_A
    else:
        if SYM:
            asm: gl.constexpr = STEP_B_SE if WITH_E else STEP_B_S
        else:
            asm: gl.constexpr = STEP_B_AE if WITH_E else STEP_B_A
    out = gl.inline_asm_elementwise(asm, STEP_CONSTRAINTS, [w, xq], dtype=gl.float32, is_pure=True, pack=16)
    v0, v1, v2, v3, v4 = _first5(out)
    return (gl.convert_layout(v0, L3, assert_trivial=True), gl.convert_layout(v1, L3, assert_trivial=True),
            gl.convert_layout(v2, L3, assert_trivial=True), gl.convert_layout(v3, L3, assert_trivial=True),
            gl.convert_layout(v4, L3, assert_trivial=True))


@gluon.jit
def _pack2(lo, hi, F16: gl.constexpr):
    """float32 lo, hi -> int32 with the 16-bit (bf16 or fp16, round to nearest) lo in the low half."""
    if F16:
        asm: gl.constexpr = "cvt.rn.f16x2.f32 $0, $2, $1;"
    else:
        asm: gl.constexpr = "cvt.rn.bf16x2.f32 $0, $2, $1;"
    return gl.inline_asm_elementwise(asm, "=r,f,f", [lo, hi], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _gdc(WAIT: gl.constexpr):
    """griddepcontrol.wait (WAIT) or .launch_dependents (pdl.py's protocol)."""
    if WAIT:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)
    else:
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)


@gluon.jit
def _l3(v, L3: gl.constexpr):
    """A split's [W, 8, 4] result in L3 (the same registers: asserted)."""
    return gl.convert_layout(v, L3, assert_trivial=True)


@gluon.jit
def _apply(acc, d, e, s, z, OFF: gl.constexpr, ASYM: gl.constexpr):
    """acc [W, 8, 4] += scale (D - (OFF + zero) E) (sym: OFF already holds 8)."""
    if ASYM:
        return acc + s * (d - (z + OFF) * e)
    return acc + s * (d - OFF * e)


@gluon.jit
def _accumulate(a0, a1, a2, a3, d0, d1, d2, d3, e, sc, z, OFF: gl.constexpr, ASYM: gl.constexpr,
                L3: gl.constexpr):
    """The block's sums d_j of rows j = 0..3 (and sum(x) e) into the accumulators: a_j += scale_j (d_j - (OFF +
    zero_j) e); sc, z [W, 8, 4, 4] the row group's scales and zeros (or the scales again, sym)."""
    s_0, s_1, s_2, s_3 = _split4(sc.to(gl.float32))
    if ASYM:
        z_0, z_1, z_2, z_3 = _split4(z.to(gl.float32))
    else:
        z_0 = s_0
        z_1 = s_1
        z_2 = s_2
        z_3 = s_3
    return (_apply(a0, d0, e, _l3(s_0, L3), _l3(z_0, L3), OFF, ASYM),
            _apply(a1, d1, e, _l3(s_1, L3), _l3(z_1, L3), OFF, ASYM),
            _apply(a2, d2, e, _l3(s_2, L3), _l3(z_2, L3), OFF, ASYM),
            _apply(a3, d3, e, _l3(s_3, L3), _l3(z_3, L3), OFF, ASYM))


@gluon.jit
def _epilogue(out, up, ssq, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS: gl.constexpr,
              SILU: gl.constexpr, NORM: gl.constexpr, HAS_RES: gl.constexpr):
    """out, up [8, 4] float32 sums of rows `rows`, ssq the sum of x^2 over K -> y (gemv_il._il4_epilogue)."""
    rmask = rows < N_OUT
    if NORM:
        rstd = gl.rsqrt(ssq / K + eps)
        out = out * rstd
        up = up * rstd
    if HAS_BIAS:
        out += gl.load(bias_ptr + rows, mask=rmask, other=0.0).to(gl.float32)
    if SILU:
        out = out / (1.0 + gl.exp(-out)) * up
    if HAS_RES:
        out += gl.load(res_ptr + rows, mask=rmask, other=0.0).to(gl.float32)
    gl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)


@gluon.jit
def _by_lane(a0, a1, a2, a3):
    """[W, 8, 4] sums of rows j = 0..3 (every lane c the same) -> [8, 4] over the warps, lane c holding row j = c."""
    L2: gl.constexpr = gl.SliceLayout(0, a0.type.layout)
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, L2))[None, :]
    o0 = gl.sum(a0, axis=0)
    o1 = gl.sum(a1, axis=0)
    o2 = gl.sum(a2, axis=0)
    o3 = gl.sum(a3, axis=0)
    return gl.where(c == 0, o0, gl.where(c == 1, o1, gl.where(c == 2, o2, o3)))


@gluon.jit
def _load_block(w_ptr, s_ptr, z_ptr, woff, soff, wv, wvs, i, kb0, nblk, NB, W: gl.constexpr, ASYM: gl.constexpr):
    """Step i's words [W, 8, 4, 16] (warp w: block kb0 + i W + w), its row groups' scales [W, 8, 4, 4] and zeros
    (ASYM; else the scales again). A warp past the program's blocks reads nothing (words and scales 0)."""
    lb = i * W + wv
    gb = gl.minimum(kb0 + lb, NB - 1)
    w = gl.load(w_ptr + woff + gb[:, None, None, None] * 64, mask=(lb < nblk)[:, None, None, None], other=0)
    lbs = i * W + wvs
    gbs = gl.minimum(kb0 + lbs, NB - 1)
    oks = (lbs < nblk)[:, None, None, None]
    sc = gl.load(s_ptr + soff + gbs[:, None, None, None] * 4, mask=oks, other=0.0)
    if ASYM:
        z = gl.load(z_ptr + soff + gbs[:, None, None, None] * 4, mask=oks, other=0)
    else:
        z = sc
    return w, sc, z


@gluon.jit
def gemv_il4_mma_kernel(
    # x (K,) bf16/fp16, words (N/4, KW, 4) int32 (il4), scales and zeros (N/4, NB, 4) (zeros: dummy unless asym),
    # bias (N_OUT,) or dummy, RMSNorm weight (K,) or dummy, residual (N_OUT,) or dummy, y (N_OUT,);
    # SPLIT > 1: partials (programs, SPLIT, 65) float32 and arrival counters (programs,) int32 (zeros), else dummies
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, nw_ptr, res_ptr, y_ptr, part_ptr, cnt_ptr,
    N_OUT, K, NB, eps,
    ENC: gl.constexpr, HAS_BIAS: gl.constexpr, SILU: gl.constexpr, NORM: gl.constexpr, HAS_RES: gl.constexpr,
    F16: gl.constexpr, NBS: gl.constexpr, SPLIT: gl.constexpr, AHEAD: gl.constexpr, PDL: gl.constexpr,
    KNOCK: gl.constexpr, num_warps: gl.constexpr,
):
    """The module docstring says what a program does. NBS: blocks a program (NB with SPLIT 1). KNOCK (timing only,
    wrong results; QRUN_MMA_KNOCK, docs/PERF.md round 17): 1 the loop's loads without its arithmetic (the words
    are only added up), 2 its arithmetic without its loads (step 0's weights every step), 3 as 1 with no x loaded
    (the staging's loads masked off)."""
    W: gl.constexpr = num_warps
    NST: gl.constexpr = (NBS + W - 1) // W  # steps: warp w's blocks w + W i, i < NST
    ASYM: gl.constexpr = ENC == "int4_asym"
    SYM: gl.constexpr = not ASYM
    if F16:
        OFF: gl.constexpr = 1032.0 if SYM else 1024.0
    else:
        OFF: gl.constexpr = 136.0 if SYM else 128.0
    # [warp, g, c, 16]: a lane's 16 words (chunk s, row j at 4 s + j), or its 16 x pairs; [warp, g, c, 4] its row
    # group's 4 scales. A size-1 dimension (x pairs: [W, 1, 4, 16]) is the same in the lanes along it.
    LW: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 1, 16], threads_per_warp=[1, 8, 4, 1],
                                        warps_per_cta=[W, 1, 1, 1], order=[3, 2, 1, 0])
    LS: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 1, 4], threads_per_warp=[1, 8, 4, 1],
                                        warps_per_cta=[W, 1, 1, 1], order=[3, 2, 1, 0])
    # staging: [row of 8 k, half, 4 k], a thread 4 k (one 8-byte load of x)
    LX: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 4], threads_per_warp=[16, 2, 1],
                                        warps_per_cta=[W, 1, 1], order=[2, 1, 0])
    pid = gl.program_id(0)
    sp = gl.program_id(1)
    N4 = N_OUT // 4
    KW = NB * 16
    kb0 = sp * NBS
    nblk = gl.minimum(NBS, NB - kb0)  # this program's blocks

    wv = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LW))))
    gv = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LW))))
    cv = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LW))))
    tv = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LW))))
    rg = gl.minimum(pid * 8 + gv, N4 - 1)  # clamped: every load in bounds
    # lane c's chunk s is word 4 s + c of the block: each 16-byte load instruction (one s) reads 64 contiguous
    # bytes a row group, whole 32-byte sectors
    woff = (rg[None, :, None, None] * (KW * 4) + cv[None, None, :, None] * 4
            + (tv // 4)[None, None, None, :] * 16 + (tv % 4)[None, None, None, :])    # [1, 8, 4, 16]
    gvs = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LS))))
    cvs = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LS))))
    jv = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LS))))
    rgs = gl.minimum(pid * 8 + gvs, N4 - 1)
    soff = rgs[None, :, None, None] * (NB * 4) + cvs[None, None, :, None] * 0 + jv[None, None, None, :]
    if SILU:
        uoff = woff + N4 * (KW * 4)
        usoff = soff + N4 * (NB * 4)
    wvs = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LS))))

    # the first AHEAD blocks' weights before waiting on the previous kernel (they depend on nothing it writes)
    w0, s0, z0 = _load_block(w_ptr, s_ptr, z_ptr, woff, soff, wv, wvs, 0, kb0, nblk, NB, W, ASYM)
    if SILU:
        u0, us0, uz0 = _load_block(w_ptr, s_ptr, z_ptr, uoff, usoff, wv, wvs, 0, kb0, nblk, NB, W, ASYM)
    else:
        u0 = w0
        us0 = s0
        uz0 = z0
    if AHEAD == 2:
        w1, s1, z1 = _load_block(w_ptr, s_ptr, z_ptr, woff, soff, wv, wvs, 1, kb0, nblk, NB, W, ASYM)
        if SILU:
            u1, us1, uz1 = _load_block(w_ptr, s_ptr, z_ptr, uoff, usoff, wv, wvs, 1, kb0, nblk, NB, W, ASYM)
        else:
            u1 = w1
            us1 = s1
            uz1 = z1

    if PDL == 1:
        _gdc(True)
        _gdc(False)
    elif PDL == 2:
        _gdc(False)
        _gdc(True)
    elif PDL == 3:
        _gdc(False)

    # x staged as the mma's B pairs: 8 k (a word position p of a block) -> (k0, k2), (k1, k3), (k4, k6), (k5, k7),
    # position p = 4 s + c stored at row 4 c + s of its block, so that lane c's 4 chunks are 64 contiguous bytes;
    # rows past the program's blocks (and k past K) are 0, so the steps past them add nothing
    PLAIN3: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    PLAIN5: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[3, 2, 1, 0])
    xbuf = gl.allocate_shared_memory(gl.int32, [NST, W * 16, 4], PLAIN3)
    rr = gl.arange(0, W * 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX)))
    hh = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX)))
    ii = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
    src = (rr // 16) * 16 + (rr % 4) * 4 + (rr // 4) % 4  # the word position stored at row rr
    kk = src[:, None, None] * 8 + hh[None, :, None] * 4 + ii[None, None, :]              # [W 16, 2, 4]
    ssq = gl.zeros([W * 16, 2, 4], gl.float32, LX)
    kend = gl.minimum((kb0 + nblk) * 128, K)
    for i in gl.static_range(NST):
        k = kb0 * 128 + i * (W * 128) + kk
        km = (k < kend) & (KNOCK != 3)
        xv = gl.load(x_ptr + k, mask=km, other=0.0).to(gl.float32)
        if NORM:
            ssq += xv * xv
            xv = xv * gl.load(nw_ptr + k, mask=km, other=0.0).to(gl.float32)
        ev, od = gl.split(gl.reshape(xv, [W * 16, 2, 2, 2]))  # [.., 2]: (k0, k2) and (k1, k3) of each half
        e0, e2 = gl.split(ev)
        o1, o3 = gl.split(od)
        pairs = gl.reshape(gl.join(_pack2(e0, e2, F16), _pack2(o1, o3, F16)), [W * 16, 4])
        xbuf.index(i).store(pairs)
    _cta_barrier()
    if _reinterpret_name() == "new":
        xq5 = xbuf.reinterpret(gl.int32, [NST, W, 1, 4, 16], PLAIN5)
    else:
        xq5 = xbuf._reinterpret(gl.int32, [NST, W, 1, 4, 16], PLAIN5)

    L3: gl.constexpr = gl.SliceLayout(3, LW)
    a0 = gl.zeros([W, 8, 4], gl.float32, L3)
    a1 = gl.zeros([W, 8, 4], gl.float32, L3)
    a2 = gl.zeros([W, 8, 4], gl.float32, L3)
    a3 = gl.zeros([W, 8, 4], gl.float32, L3)
    b0 = gl.zeros([W, 8, 4], gl.float32, L3)
    b1 = gl.zeros([W, 8, 4], gl.float32, L3)
    b2 = gl.zeros([W, 8, 4], gl.float32, L3)
    b3 = gl.zeros([W, 8, 4], gl.float32, L3)
    for i in range(NST):
        # the weights AHEAD blocks on
        if KNOCK == 2:
            wn = w0
            sn = s0
            zn = z0
            un = u0
            usn = us0
            uzn = uz0
        else:
            wn, sn, zn = _load_block(w_ptr, s_ptr, z_ptr, woff, soff, wv, wvs, i + AHEAD, kb0, nblk, NB, W, ASYM)
            if SILU:
                un, usn, uzn = _load_block(w_ptr, s_ptr, z_ptr, uoff, usoff, wv, wvs, i + AHEAD, kb0, nblk, NB, W,
                                           ASYM)
        if KNOCK == 1 or KNOCK == 3:
            a0 += gl.sum(w0, axis=3).to(gl.float32) + gl.convert_layout(gl.sum(s0, axis=3).to(gl.float32), L3)
            if SILU:
                b0 += gl.sum(u0, axis=3).to(gl.float32) + gl.convert_layout(gl.sum(us0, axis=3).to(gl.float32), L3)
        else:
            xq = xq5.index(i).load(LW)                                                     # [W, 1, 4, 16]
            xq, _w = gl.broadcast(xq, w0)  # the x pairs to every lane g of their lane c
            d0, d1, d2, d3, e = _step(w0, xq, F16, SYM, True, L3)
            a0, a1, a2, a3 = _accumulate(a0, a1, a2, a3, d0, d1, d2, d3, e, s0, z0, OFF, ASYM, L3)
            if SILU:
                f0, f1, f2, f3, _unused = _step(u0, xq, F16, SYM, False, L3)
                b0, b1, b2, b3 = _accumulate(b0, b1, b2, b3, f0, f1, f2, f3, e, us0, uz0, OFF, ASYM, L3)
        if AHEAD == 2:
            w0 = w1
            s0 = s1
            z0 = z1
            w1 = wn
            s1 = sn
            z1 = zn
            if SILU:
                u0 = u1
                us0 = us1
                uz0 = uz1
                u1 = un
                us1 = usn
                uz1 = uzn
        else:
            w0 = wn
            s0 = sn
            z0 = zn
            if SILU:
                u0 = un
                us0 = usn
                uz0 = uzn

    out = _by_lane(a0, a1, a2, a3)                                                       # [8, 4]
    if SILU:
        up = _by_lane(b0, b1, b2, b3)
    else:
        up = out
    if NORM:
        sq = gl.sum(gl.sum(gl.sum(ssq, axis=2), axis=1), axis=0)
    else:
        sq = 0.0
    OL: gl.constexpr = out.type.layout
    loc = gl.arange(0, 8, layout=gl.SliceLayout(1, OL))[:, None] * 4 \
        + gl.arange(0, 4, layout=gl.SliceLayout(0, OL))[None, :]                          # [8, 4]
    rows = pid * 32 + loc
    if SPLIT == 1:
        _epilogue(out, up, sq, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS, SILU, NORM, HAS_RES)
    else:
        PW: gl.constexpr = 65  # a slot: 32 gate (or only) sums, 32 up sums, the sum of x^2
        pp = part_ptr + pid * (SPLIT * PW)
        mine = pp + sp * PW
        gl.store(mine + loc, out)
        if SILU:
            gl.store(mine + 32 + loc, up)
        if NORM:
            gl.store(mine + 64, sq)
        _cta_barrier()  # every thread's partials before the counter's release
        arrived = gl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:  # the last program of this row set: the sum of the partials, the epilogue
            gl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")
            tot = gl.zeros_like(out)
            utot = gl.zeros_like(out)
            stot = 0.0
            for q in gl.static_range(SPLIT):  # in split order: the sum does not depend on who came last
                tot += gl.load(pp + q * PW + loc, cache_modifier=".cg")
                if SILU:
                    utot += gl.load(pp + q * PW + 32 + loc, cache_modifier=".cg")
                if NORM:
                    stot += gl.load(pp + q * PW + 64, cache_modifier=".cg")
            _epilogue(tot, utot, stot, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS, SILU, NORM,
                      HAS_RES)
