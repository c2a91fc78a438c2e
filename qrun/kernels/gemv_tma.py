"""Decode GEMV (M = 1) for int4 weights in "il4" on Hopper, written in Gluon: the packed weights stream into shared
memory by TMA, a persistent program a SM.

Why a second il4 GEMV: gemv_il.py loads weights into registers, two (or three) steps ahead, so each program has
~1-2 KB in flight and waits a memory latency every step or two. 7B down (K = 18944) ran at ~60% of the copy
bandwidth and 7B qkv and o at 34-40% (docs/PERF.md rounds 8-11); splitting K, L2 prefetches and early launches
moved little. Here the copy engine keeps STAGES units of weights in flight per SM (6 x 8 KB = 48 KB, ~6 MB over
132 SMs), and the warps only read shared memory.

Work: the weight's row groups (4 rows, il4) in blocks of RB (a row block), K in units of 64 word positions (512
k), a "unit" being one row block x 512 k: RB x 1 KB of packed words, with its scales (and zeros) and x's 512
values (and the RMSNorm weight's). Units go K-fastest, and program p of P takes units [p U / P, (p + 1) U / P),
so every program has the same bytes to read (stream-K). A row block whose units one program covers is stored by
it; one split between programs has each add its partial sums (and its share of sum(x^2)) into a slot of its own,
and the last to arrive (a counter per row block) sums the slots in program order and stores the rows: the
result does not depend on who comes last, and nobody waits.

Per unit, all warps wait on the unit's two barriers (weights, scales and zeros; x and the norm weight), read
their share into registers, meet at a CTA barrier, and one thread issues the TMA loads of unit n + STAGES into
the buffer just read; then the warps compute. A thread holds one word position (4 rows x 8 k) of RB / (warps /
2) row groups: the x values of its position once for all of them. The arithmetic is gemv_il's (_dot_words: 8
PRMT + 8 FFMA a word). With PDL (pdl.py) the first STAGES units' weights are requested before the wait on the
previous kernel, x's after it.

Limits (ops._tma_gemv_ok checks them; otherwise gemv_il4_kernel runs): int4 sym or asym in il4, K a multiple of
512 with one K (no padding), 32 <= block <= 256 (128 for asym: TMA boxes of at least 16 bytes of zeros),
scales' and zeros' rows 16-byte aligned, x and the norm weight contiguous and 16-byte aligned, sm_90 with Gluon.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from .gemm_wg import _cta_barrier, _reinterpret_name, _tma_load
from .gemv_il import DOT_ASYM, DOT_CONSTRAINTS, DOT_SYM

KC = gl.constexpr(64)  # word positions a unit (512 k)
# TMA boxes, unswizzled (row-major in shared memory): words (RB, 4 KC) int32, scales (RB, 4 NBT) 16-bit, zeros
# (RB, 4 NBT) uint8, x and the norm weight (2, 256) 16-bit
W_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
H_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
B_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)


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
def _dot(w, x0, x1, x2, x3, x4, x5, x6, x7, c, ASYM: gl.constexpr):
    """gemv_il._dot_words: float32 sum_i (128 + u_i) x_i + c per word (u_i nibble i, XORed with 8 for sym)."""
    if ASYM:
        asm: gl.constexpr = DOT_ASYM
    else:
        asm: gl.constexpr = DOT_SYM
    return gl.inline_asm_elementwise(asm, DOT_CONSTRAINTS, [w, x0, x1, x2, x3, x4, x5, x6, x7, c],
                                     dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _view(buf, dtype: gl.constexpr, shape: gl.constexpr):
    """A ring of TMA boxes (unswizzled, so row-major) seen as a plain row-major array of `shape` (the buffer index
    first; the layout is a buffer's)."""
    PLAIN: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                  order=list(range(len(shape) - 2, -1, -1)))
    if _reinterpret_name() == "new":
        return buf.reinterpret(dtype, shape, PLAIN)
    else:
        return buf._reinterpret(dtype, shape, PLAIN)


@gluon.jit
def _load_w(w_desc, s_desc, z_desc, wg, wu, sg, su, zg, zu, bar, i, rb, kt, N4, ASYM: gl.constexpr,
            SILU: gl.constexpr):
    """TMA of unit (rb, kt)'s packed words, scales (and zeros) into buffer i: the gate (or only) rows' and, with
    SILU, the same rows of up (row groups + N4, N4 = N_OUT / 4)."""
    RB: gl.constexpr = w_desc.block_type.shape[0]
    NS: gl.constexpr = s_desc.block_type.shape[1]  # scales a row group a unit (4 NBT)
    ONE: gl.constexpr = w_desc.block_type.nbytes + s_desc.block_type.nbytes + (z_desc.block_type.nbytes if ASYM
                                                                                else 0)
    mbarrier.expect(bar.index(i), ONE * 2 if SILU else ONE)
    g = rb * RB
    _tma_load(w_desc, [g, kt * (4 * KC)], bar.index(i), wg.index(i))
    _tma_load(s_desc, [g, kt * NS], bar.index(i), sg.index(i))
    if ASYM:
        _tma_load(z_desc, [g, kt * NS], bar.index(i), zg.index(i))
    if SILU:
        _tma_load(w_desc, [g + N4, kt * (4 * KC)], bar.index(i), wu.index(i))
        _tma_load(s_desc, [g + N4, kt * NS], bar.index(i), su.index(i))
        if ASYM:
            _tma_load(z_desc, [g + N4, kt * NS], bar.index(i), zu.index(i))


@gluon.jit
def _load_x(x_desc, n_desc, xr, nr, bar, i, kt, NORM: gl.constexpr):
    """TMA of x[512 kt : 512 (kt + 1)] (and the norm weight's) into buffer i."""
    XB: gl.constexpr = x_desc.block_type.nbytes
    mbarrier.expect(bar.index(i), XB * 2 if NORM else XB)
    _tma_load(x_desc, [kt * 2, 0], bar.index(i), xr.index(i))
    if NORM:
        _tma_load(n_desc, [kt * 2, 0], bar.index(i), nr.index(i))


@gluon.jit
def _split_x(xv, L4: gl.constexpr):
    """xv (1, NBT, PB, 8) float32, x of each word position -> x_0 .. x_7 (1, NBT, PB, 1) in L4 (registers renamed)."""
    S: gl.constexpr = gl.SliceLayout(3, L4)
    t = gl.reshape(xv, [xv.shape[0], xv.shape[1], xv.shape[2], 2, 2, 2])  # i = 4 a + 2 b + c
    c0, c1 = gl.split(t)
    c00, c01 = gl.split(c0)
    c10, c11 = gl.split(c1)
    x0, x4 = gl.split(c00)
    x2, x6 = gl.split(c01)
    x1, x5 = gl.split(c10)
    x3, x7 = gl.split(c11)
    return (gl.convert_layout(x0, S, assert_trivial=True)[:, :, :, None],
            gl.convert_layout(x1, S, assert_trivial=True)[:, :, :, None],
            gl.convert_layout(x2, S, assert_trivial=True)[:, :, :, None],
            gl.convert_layout(x3, S, assert_trivial=True)[:, :, :, None],
            gl.convert_layout(x4, S, assert_trivial=True)[:, :, :, None],
            gl.convert_layout(x5, S, assert_trivial=True)[:, :, :, None],
            gl.convert_layout(x6, S, assert_trivial=True)[:, :, :, None],
            gl.convert_layout(x7, S, assert_trivial=True)[:, :, :, None])


@gluon.jit
def _rows_dot(acc, w, s, z, x0, x1, x2, x3, x4, x5, x6, x7, xs, ASYM: gl.constexpr):
    """acc (R, NBT, PB, 4) += scale * sum_i q_i x_i for each word; x_i and xs = sum_i x_i (1, NBT, PB, 1), scales
    and zeros (R, NBT, 1, 4) float32."""
    if ASYM:
        d = _dot(w, x0, x1, x2, x3, x4, x5, x6, x7, -128.0 * xs, ASYM)  # f = 128 + u, q = u - z
        d = d - z * xs
    else:
        d = _dot(w, x0, x1, x2, x3, x4, x5, x6, x7, -136.0 * xs, ASYM)  # f = 128 + (q + 8)
    return acc + d * s


@gluon.jit
def _epilogue(out, up, ssq, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS: gl.constexpr,
              SILU: gl.constexpr, NORM: gl.constexpr, HAS_RES: gl.constexpr):
    """out, up (RB, 4) float32 sums of rows `rows`, ssq the sum of x^2 over K -> y, as gemv_il._il4_epilogue."""
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
def _flush(acc, acc_u, ssq, u, kt, rb, start, pid, P, U, NKT, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, part_ptr,
           cnt_ptr, RB: gl.constexpr, HAS_BIAS: gl.constexpr, SILU: gl.constexpr, NORM: gl.constexpr,
           HAS_RES: gl.constexpr, L4: gl.constexpr, LX: gl.constexpr):
    """The end of this program's share of row block rb (u its last unit here, kt that unit's K position): its
    rows, or its partial sums into its slot and, if it is the last to arrive, the sum of the slots' rows."""
    out = gl.sum(gl.sum(acc, axis=2), axis=1)                                       # (RB, 4)
    if SILU:
        up = gl.sum(gl.sum(acc_u, axis=2), axis=1)
    else:
        up = out
    if NORM:
        sq = gl.sum(gl.sum(gl.sum(ssq, axis=2), axis=1), axis=0)
    else:
        sq = 0.0
    OL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L4))
    g = gl.arange(0, RB, layout=gl.SliceLayout(1, OL))
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, OL))
    loc = g[:, None] * 4 + j[None, :]                                               # (RB, 4)
    rows = rb * (4 * RB) + loc
    u0 = u - kt  # the row block's first unit
    PW: gl.constexpr = 8 * RB + 1  # a slot: the gate (or only) sums, the up sums, sum(x^2)
    if (u0 >= start) & (kt == NKT - 1):
        _epilogue(out, up, sq, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS, SILU, NORM, HAS_RES)
    else:
        # slots: two a program, 0 for the row block its share starts in, 1 for the one it ends in
        mine = part_ptr + (pid * 2 + gl.where(start >= u0, 0, 1)) * PW
        gl.store(mine + loc, out)
        if SILU:
            gl.store(mine + 4 * RB + loc, up)
        if NORM:
            gl.store(mine + 8 * RB, sq)
        _cta_barrier()  # every thread's stores, before the counter (release) says they are there
        first = ((u0 + 1) * P - 1) // U  # the programs sharing the block: owners of its first and last units
        last = ((u0 + NKT) * P - 1) // U
        arrived = gl.atomic_add(cnt_ptr + rb, 1, sem="acq_rel")
        if arrived == last - first:
            tot = gl.zeros_like(out)
            utot = gl.zeros_like(out)
            stot = 0.0
            for c in range(first, last + 1):  # in program order: the sum does not depend on who came last
                slot = part_ptr + (c * 2 + gl.where((c * U) // P >= u0, 0, 1)) * PW
                tot += gl.load(slot + loc, cache_modifier=".cg")
                if SILU:
                    utot += gl.load(slot + 4 * RB + loc, cache_modifier=".cg")
                if NORM:
                    stot += gl.load(slot + 8 * RB, cache_modifier=".cg")
            gl.store(cnt_ptr + rb, 0)  # clean for the next call
            _epilogue(tot, utot, stot, rows, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr, HAS_BIAS, SILU, NORM,
                      HAS_RES)


@gluon.jit
def gemv_il4_tma_kernel(
    # TMA descriptors: x and the norm weight (K / 256, 256) in (2, 256) boxes; the packed il4 words (N / 4, K / 2)
    # int32 in (RB, 256) boxes; scales and zeros (N / 4, 4 NB) in (RB, 4 NBT) boxes (zeros: a dummy unless ASYM);
    # bias, residual (N_OUT,) or dummies; y (N_OUT,); the workspace: part (programs, 2, 8 RB + 1) float32 and
    # cnt (row blocks,) int32, zeros before the first call (every call leaves them so)
    x_desc, n_desc, w_desc, s_desc, z_desc, bias_ptr, res_ptr, y_ptr, part_ptr, cnt_ptr,
    N_OUT, K, NKT, U, eps,
    B: gl.constexpr, ASYM: gl.constexpr, HAS_BIAS: gl.constexpr, SILU: gl.constexpr, NORM: gl.constexpr,
    HAS_RES: gl.constexpr, STAGES: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr,
    KNOCK: gl.constexpr = 0,
):
    """y = dequant(W) x (+ bias) (+ residual), or with NORM of rmsnorm(x) * norm weight, or with SILU (rows [0,
    N_OUT) gate, [N_OUT, 2 N_OUT) up) silu(gate) * up. U = row blocks x NKT units (NKT = K / 512).
    KNOCK (benchmarks only, QRUN_TMA_KNOCK; the result is wrong unless 0): 1 leaves the arithmetic out (each word
    added as a float), to time the loads and the ring alone; 2 leaves the loop's loads and waits out (the
    arithmetic runs on what the prologue loaded), to time the arithmetic alone."""
    RB: gl.constexpr = w_desc.block_type.shape[0]
    PB: gl.constexpr = B // 8          # word positions a quantization block
    NBT: gl.constexpr = KC // PB       # quantization blocks a unit
    WR: gl.constexpr = num_warps // 2  # warps along the row groups; 2 along K
    gl.static_assert(RB % WR == 0, "RB must be a multiple of num_warps / 2")
    # [row group, block, position in the block, row j of the group]: a thread one position, RB / WR groups
    L4: gl.constexpr = gl.BlockedLayout(size_per_thread=[RB // WR, 1, 1, 4], threads_per_warp=[1, 32 // PB, PB, 1],
                                        warps_per_cta=[WR, 2, 1, 1], order=[3, 2, 1, 0])
    # x of a unit [1, block, position, i]: a thread the 8 values of its position (k = 8 position + i)
    LX: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 1, 8], threads_per_warp=[1, 32 // PB, PB, 1],
                                        warps_per_cta=[WR, 2, 1, 1], order=[3, 2, 1, 0])
    XD: gl.constexpr = x_desc.dtype
    SD: gl.constexpr = s_desc.dtype
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    start = (pid * U) // P
    end = ((pid + 1) * U) // P
    N4 = N_OUT // 4

    wg = gl.allocate_shared_memory(gl.int32, [STAGES, RB, 4 * KC], w_desc.layout)
    sg = gl.allocate_shared_memory(SD, [STAGES, RB, 4 * NBT], s_desc.layout)
    xr = gl.allocate_shared_memory(XD, [STAGES, 2, 256], x_desc.layout)
    if ASYM:
        zg = gl.allocate_shared_memory(gl.uint8, [STAGES, RB, 4 * NBT], z_desc.layout)
    else:
        zg = sg
    if SILU:
        wu = gl.allocate_shared_memory(gl.int32, [STAGES, RB, 4 * KC], w_desc.layout)
        su = gl.allocate_shared_memory(SD, [STAGES, RB, 4 * NBT], s_desc.layout)
        if ASYM:
            zu = gl.allocate_shared_memory(gl.uint8, [STAGES, RB, 4 * NBT], z_desc.layout)
        else:
            zu = su
    else:
        wu = wg
        su = sg
        zu = zg
    if NORM:
        nr = gl.allocate_shared_memory(XD, [STAGES, 2, 256], n_desc.layout)
    else:
        nr = xr
    wbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    xbar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(wbar.index(i), count=1)
        mbarrier.init(xbar.index(i), count=1)

    # prologue: the first STAGES units' weights before waiting on the previous kernel (they depend on nothing it
    # writes), x after
    kt0 = start % NKT
    rb0 = start // NKT
    kl = kt0
    rl = rb0
    for j in gl.static_range(STAGES):
        if start + j < end:
            _load_w(w_desc, s_desc, z_desc, wg, wu, sg, su, zg, zu, wbar, j, rl, kl, N4, ASYM, SILU)
            kl += 1
            if kl == NKT:
                kl = 0
                rl += 1
    if PDL == 1:
        _gdc(True)
        _gdc(False)
    elif PDL == 2:
        _gdc(False)
        _gdc(True)
    elif PDL == 3:
        _gdc(False)
    kx = kt0
    for j in gl.static_range(STAGES):
        if start + j < end:
            _load_x(x_desc, n_desc, xr, nr, xbar, j, kx, NORM)
            kx = (kx + 1) % NKT

    # the rings seen as [row group, block, position, j] words, [row group, block, 1, j] scales and zeros, and
    # [1, block, position, i] x
    wg4 = _view(wg, gl.int32, [STAGES, RB, NBT, PB, 4])
    sg4 = _view(sg, SD, [STAGES, RB, NBT, 1, 4])
    xr4 = _view(xr, XD, [STAGES, 1, NBT, PB, 8])
    if ASYM:
        zg4 = _view(zg, gl.uint8, [STAGES, RB, NBT, 1, 4])
    if SILU:
        wu4 = _view(wu, gl.int32, [STAGES, RB, NBT, PB, 4])
        su4 = _view(su, SD, [STAGES, RB, NBT, 1, 4])
        if ASYM:
            zu4 = _view(zu, gl.uint8, [STAGES, RB, NBT, 1, 4])
    if NORM:
        nr4 = _view(nr, XD, [STAGES, 1, NBT, PB, 8])

    acc = gl.zeros([RB, NBT, PB, 4], gl.float32, L4)
    acc_u = gl.zeros([RB, NBT, PB, 4], gl.float32, L4)
    ssq = gl.zeros([1, NBT, PB], gl.float32, gl.SliceLayout(3, LX))
    kt = kt0
    rb = rb0
    for u in range(start, end):
        n = u - start
        buf = n % STAGES
        ph = (n // STAGES) & 1
        if KNOCK != 2:
            mbarrier.wait(wbar.index(buf), ph)
            mbarrier.wait(xbar.index(buf), ph)
        w = wg4.index(buf).load(L4)
        s = sg4.index(buf).load(L4).to(gl.float32)
        if ASYM:
            z = zg4.index(buf).load(L4).to(gl.float32)
        else:
            z = s
        if SILU:
            w2 = wu4.index(buf).load(L4)
            s2 = su4.index(buf).load(L4).to(gl.float32)
            if ASYM:
                z2 = zu4.index(buf).load(L4).to(gl.float32)
            else:
                z2 = s2
        xv = xr4.index(buf).load(LX).to(gl.float32)                                   # (1, NBT, PB, 8)
        if NORM:
            nv = nr4.index(buf).load(LX).to(gl.float32)
        _cta_barrier()  # every warp has read buffer buf: unit n + STAGES may land in it
        if (u + STAGES < end) & (KNOCK != 2):
            _load_w(w_desc, s_desc, z_desc, wg, wu, sg, su, zg, zu, wbar, buf, rl, kl, N4, ASYM, SILU)
            _load_x(x_desc, n_desc, xr, nr, xbar, buf, kl, NORM)
            kl += 1
            if kl == NKT:
                kl = 0
                rl += 1
        if NORM:
            ssq += gl.sum(xv * xv, axis=3)
            xv = xv * nv
        xs = gl.convert_layout(gl.sum(xv, axis=3), gl.SliceLayout(3, L4), assert_trivial=True)[:, :, :, None]
        x0, x1, x2, x3, x4, x5, x6, x7 = _split_x(xv, L4)
        if KNOCK == 1:
            acc = acc + w.to(gl.float32) * s + xs
            if SILU:
                acc_u = acc_u + w2.to(gl.float32) * s2
        else:
            acc = _rows_dot(acc, w, s, z, x0, x1, x2, x3, x4, x5, x6, x7, xs, ASYM)
            if SILU:
                acc_u = _rows_dot(acc_u, w2, s2, z2, x0, x1, x2, x3, x4, x5, x6, x7, xs, ASYM)
        if (kt == NKT - 1) | (u == end - 1):
            _flush(acc, acc_u, ssq, u, kt, rb, start, pid, P, U, NKT, N_OUT, K, eps, bias_ptr, res_ptr, y_ptr,
                   part_ptr, cnt_ptr, RB, HAS_BIAS, SILU, NORM, HAS_RES, L4, LX)
            acc = gl.zeros([RB, NBT, PB, 4], gl.float32, L4)
            acc_u = gl.zeros([RB, NBT, PB, 4], gl.float32, L4)
            ssq = gl.zeros([1, NBT, PB], gl.float32, gl.SliceLayout(3, LX))
        kt += 1
        if kt == NKT:
            kt = 0
            rb += 1


def descriptors(x2, norm_weight, w32, scales, zeros, rb: int, block_size: int):
    """The kernel's TMA descriptors (its docstring); ops._tma_gemv_ok has checked sizes and alignment."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    k = x2.shape[-1]
    n, nb = scales.shape
    nbt = 512 // block_size

    def vec(t):  # (K,) -> (K / 256, 256) in (2, 256) boxes
        return TensorDescriptor(t.reshape(k // 256, 256), [k // 256, 256], [256, 1], [2, 256], H_LAYOUT)
    xd = vec(x2)
    nd = vec(norm_weight) if norm_weight is not None else xd
    wd = TensorDescriptor(w32.reshape(n // 4, k // 2), [n // 4, k // 2], [k // 2, 1], [rb, 256], W_LAYOUT)
    sd = TensorDescriptor(scales.reshape(n // 4, 4 * nb), [n // 4, 4 * nb], [4 * nb, 1], [rb, 4 * nbt], H_LAYOUT)
    zd = sd if zeros is None else TensorDescriptor(zeros.reshape(n // 4, 4 * nb), [n // 4, 4 * nb], [4 * nb, 1],
                                                   [rb, 4 * nbt], B_LAYOUT)
    del torch
    return xd, nd, wd, sd, zd
