"""Prefill GEMM for int4 weights in the "il4" layout on Hopper, written in Gluon: y (M, N) = x (M, K) @ dequant(W)^T.

Why a second GEMM: the Triton one (gemm.py) cannot overlap the dequantization of a K tile with the wgmmas of
the tile before it on triton 3.6. Its pipeliner leaves wgmmas in flight while the next tile's register operand
is written (triton issue 9433), so gemm.py waits for every K step's wgmmas before going on (`_wgmma_done`), and
the tensor cores idle while the warps dequantize: 0.49-0.56x of cuBLAS bf16 at M = 1024 (docs/PERF.md
attempt 61). A register operand cannot be made safe from Gluon on triton 3.6 either: a wait's dependencies are
the operand's 16-bit values, not the packed 32-bit registers the wgmma reads, so ptxas reuses those while the
wgmma runs (benchmarks/compile_check.py's SASS check finds it). Here both operands go through shared memory,
where the ordering is explicit: the dequantized W tile t is stored into one of two buffers, and the buffer is
written again (tile t + 2) only after a `wgmma.wait_group 1` has retired tile t's wgmmas. Dequantizing tile
t + 1 runs beside tile t's MMAs.

The product is computed transposed, as gemm.py's SWAP: acc (BLOCK_N, BLOCK_M) = W_tile (BLOCK_N, 64) @
x^T (64, BLOCK_M), so the weight's rows are wgmma's M side (64 a warpgroup) and M only has to fill its N side.
The packed W tile and the x tile come by TMA (STAGES buffers, STAGES - 2 tiles ahead; rows past N or M are
zero-filled), and each thread dequantizes 16-byte il4 chunks (4 rows x 8 k) read from shared memory. Plain
global loads would be waited for at every step: the proxy fence that makes the stored W tile visible to the
wgmma (fence.proxy.async) is a MEMBAR in SASS, which waits for every load of the thread still in flight. Only
the scales (a few bytes a row) still come by plain loads, issued a step ahead, before that step's dequantization.

Two kernels: gemm_il4_wg_kernel, where every warp dequantizes and issues wgmmas, and gemm_il4_ws_kernel (below:
warp-specialized, the dequantization in warps of its own; persistent, with stream-K), which the launcher times
beside it. Both dequantize with _dequant (a nibble or-ed into 1.0's mantissa and one exact FFMA).

Limits (the launcher checks them and otherwise uses gemm.py): int4_sym or int4_asym in "il4", bf16 or fp16
activations, K a multiple of 64 and quantization blocks of 64 k or more, sm_90. Gluon has no interpreter: the
tests run it on the GPU, and compile it for sm_90 offline on the CPU.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)

# TMA loads and a CTA barrier under their triton >= 3.7 names, or the device's 3.6 ones; the kernel compiles on
# both (tests/test_compile_sm90.py runs on CI's triton)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

# shared-memory layouts of the TMA boxes: x (BLOCK_M, 64) with 128-byte swizzle (wgmma's B operand); the packed W
# (BLOCK_N / 4, 32) int32 words unswizzled (the threads read 16-byte chunks)
X_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
W_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


@gluon.jit
def _scales(s_ptr, z_ptr, gsc, gzr, rmask, kt, B: gl.constexpr, ASYM: gl.constexpr, EVEN: gl.constexpr,
            V3: gl.constexpr):
    """Per row of K tile kt, float32 (BLOCK_N / 4, 4) [g, j] in SliceLayout(2, V3), the two (scale, offset) pairs
    of _dequant: 2**11 s, -(zero + 2**11) s and 2**7 s, -(zero + 2**7) s, s the scale (sym: zero 8). Each is
    exact in float32 (an fp16 scale times an integer of at most 12 bits). gsc/gzr: the row groups' offsets;
    scales and zeros [n, b] of il4 sit at (n // 4) * 4 * stride + 4 b + n % 4."""
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, V3)))
    b4 = (kt * 64) // B * 4
    if EVEN:
        s = gl.load(s_ptr + gsc[:, None] + b4 + j[None, :]).to(gl.float32)
    else:
        s = gl.load(s_ptr + gsc[:, None] + b4 + j[None, :], mask=rmask[:, None], other=0.0).to(gl.float32)
    if ASYM:
        if EVEN:
            z = gl.load(z_ptr + gzr[:, None] + b4 + j[None, :]).to(gl.float32)
        else:
            z = gl.load(z_ptr + gzr[:, None] + b4 + j[None, :], mask=rmask[:, None], other=0).to(gl.float32)
    else:
        z = gl.full(s.shape, 8.0, gl.float32, s.type.layout)
    return 2048.0 * s, -(z + 2048.0) * s, 128.0 * s, -(z + 128.0) * s


@gluon.jit
def _one_bits(n):
    """0x3F800000, the bits of 1.0, for any n >= 0 (a kernel argument, whose range the compiler does not know),
    as a runtime value: _dequant's and-or then compiles to one LOP3, a register holding it."""
    return gl.where(n >= 0, 0x3F800000, 0)


@gluon.jit
def _dequant(w, sc, one, ASYM: gl.constexpr, DT: gl.constexpr, V3: gl.constexpr):
    """Packed il4 words int32 (G, 32) of a K tile (word [g, 4 c + j]: k 8 c .. 8 c + 7 of row 4 g + j, nibble i at
    bits 4 i; a thread holds the 4 words of one c) and the rows' _scales sc -> DT (4 G, 64), rows and k in order.
    Nibble u becomes a float without a conversion: shifted to bits 12-15 (or 16-19) and or-ed into 1.0's
    mantissa, it reads as 1 + u 2**-11 (1 + u 2**-7), and one FFMA with 2**11 s, -(zero + 2**11) s makes (u - zero)
    s of it. Its product and its addend are exact in float32, so the result is the one rounding of (u - zero) s,
    as before; ~3 instructions a value (a shift per two nibbles, an and-or, an FFMA, half a pack) instead of ~8
    (PERF.md attempt 69). The reshapes only rename registers (asserted). one: 0x3F800000 (1.0's bits) as a value
    the compiler cannot see (_one_bits), so that the and-or is one LOP3 (mask immediate, 1.0 in a register)
    rather than two (a LOP3 takes one immediate)."""
    G: gl.constexpr = w.shape[0]
    s11, c11, s7, c7 = sc
    w = gl.permute(gl.reshape(w, [G, 8, 4]), [0, 2, 1])                 # [g, j, c]
    if not ASYM:
        w = w ^ -2004318072  # 0x88888888: two's complement nibbles n -> n + 8 in [0, 15]
    # nibbles 2 p and 2 p + 1 of the word at bits 12-15 and 16-19 (arithmetic shifts: the bits they bring in
    # are masked off below)
    a = gl.join(gl.join(w << 12, w >> 4), gl.join(w << 4, w >> 12))     # [g, j, c, p // 2, p % 2]
    NW: gl.constexpr = V3.warps_per_cta[0]
    VH: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4, 4], threads_per_warp=[4, 1, 8],
                                        warps_per_cta=[NW, 1, 1], order=[2, 1, 0])  # [g, j, 4 c + p]
    SH: gl.constexpr = gl.SliceLayout(2, VH)
    lo = ((a & 0xF000) | one).to(gl.float32, bitcast=True)              # 1 + u 2**-11, u nibble 2 p
    hi = ((a & 0xF0000) | one).to(gl.float32, bitcast=True)             # 1 + u 2**-7, u nibble 2 p + 1
    lo = gl.convert_layout(gl.reshape(lo, [G, 4, 32]), VH, assert_trivial=True)
    hi = gl.convert_layout(gl.reshape(hi, [G, 4, 32]), VH, assert_trivial=True)
    lo = lo * gl.convert_layout(s11, SH, assert_trivial=True)[:, :, None] \
        + gl.convert_layout(c11, SH, assert_trivial=True)[:, :, None]
    hi = hi * gl.convert_layout(s7, SH, assert_trivial=True)[:, :, None] \
        + gl.convert_layout(c7, SH, assert_trivial=True)[:, :, None]
    v = gl.convert_layout(gl.reshape(gl.join(lo, hi), [G, 4, 64]), V3, assert_trivial=True)  # k = 8 c + 2 p + h
    return gl.reshape(v.to(DT), [4 * G, 64])


@gluon.jit
def _tma_tiles(x_desc, w_desc, xs, wq, bars, kt, off_m, g0, gu, SILU: gl.constexpr, STAGES: gl.constexpr):
    """TMA x[off_m :, 64 kt :] and the packed W tile kt of the row groups from g0 (with SILU: half the tile from
    g0, the gate rows, half from gu, the up rows) into buffer kt % STAGES; its barrier completes when all have
    landed."""
    i = kt % STAGES
    GB: gl.constexpr = w_desc.block_type.shape[0]  # row groups a load
    mbarrier.expect(bars.index(i), x_desc.block_type.nbytes + (2 if SILU else 1) * w_desc.block_type.nbytes)
    _tma_load(x_desc, [off_m, kt * 64], bars.index(i), xs.index(i))
    if SILU:
        _tma_load(w_desc, [g0, kt * 32], bars.index(i), wq.index(i).slice(0, GB))
        _tma_load(w_desc, [gu, kt * 32], bars.index(i), wq.index(i).slice(GB, GB))
    else:
        _tma_load(w_desc, [g0, kt * 32], bars.index(i), wq.index(i))


@gluon.jit
def _step(s_ptr, z_ptr, x_desc, w_desc, xs, wq, ws, bars, t, NK, acc, sc, one, gsc, gzr, rmask, off_m, g0, gu,
          B: gl.constexpr, ASYM: gl.constexpr, SILU: gl.constexpr, EVEN: gl.constexpr, STAGES: gl.constexpr,
          QL: gl.constexpr, V3: gl.constexpr, USE_ACC: gl.constexpr):
    """K tile t: dequantize the W tile into a wgmma buffer, issue the TMA loads STAGES - 2 tiles ahead and the
    wgmmas, and wait until only this tile's are in flight."""
    DT: gl.constexpr = x_desc.dtype
    D: gl.constexpr = STAGES - 2
    i = t % STAGES
    tn = gl.minimum(t + 1, NK - 1)  # the next tile (a harmless reload of the last one at the end)
    # the next tile's scales now, so that their latency passes under this tile's dequantization
    scn = _scales(s_ptr, z_ptr, gsc, gzr, rmask, tn, B, ASYM, EVEN, V3)
    mbarrier.wait(bars.index(i), (t // STAGES) & 1)                      # x and W tile t have landed
    # W tile t into wgmma buffer t % 2: the wgmmas that read it last (tile t - 2) retired at this warpgroup's
    # wait in step t - 1, and each warpgroup reads only the rows its own warps write
    ws.index(t % 2).store(_dequant(wq.index(i).load(QL), sc, one, ASYM, DT, V3))
    fence_async_shared()  # the stores above, before the wgmmas (async proxy) read them
    # every warp has stored its rows and read its W bytes of tile t, and every warpgroup has retired tile
    # t - 2's wgmmas, so buffer (t + D) % STAGES = (t - 2) % STAGES is free for tile t + D
    _cta_barrier()
    if t + D < NK:
        _tma_tiles(x_desc, w_desc, xs, wq, bars, t + D, off_m, g0, gu, SILU, STAGES)
    xv = xs.index(i).permute((1, 0))                                     # (64, BLOCK_M), K-major
    acc = warpgroup_mma(ws.index(t % 2), xv, acc, use_acc=USE_ACC, is_async=True)
    acc = warpgroup_mma_wait(1, deps=[acc])                              # tile t - 1's group retired
    return acc, scn


@gluon.jit
def _row_groups(r0, N_OUT, stride_sn, stride_zn, G: gl.constexpr, SILU: gl.constexpr, V3: gl.constexpr):
    """The G row groups of a tile from output row r0: which are in range, and their scales' and zeros' offsets
    (_scales). With SILU, groups 0 .. G/2 - 1 are gate rows and G/2 .. G - 1 the same rows of up (+ N_OUT)."""
    g0 = r0 // 4
    i = gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, V3)))
    if SILU:
        h = i // (G // 2)
        ro = r0 + 4 * (i % (G // 2))                                     # output row of the group's first row
        grp = g0 + i % (G // 2) + h * (N_OUT // 4)
    else:
        ro = r0 + 4 * i
        grp = g0 + i
    return ro < N_OUT, grp * (4 * stride_sn), grp * (4 * stride_zn)


@gluon.jit
def _gemm_tiles(x_desc, w_desc, s_ptr, z_ptr, xs, wq, ws, bars, r0, N_OUT, off_m, NK, stride_sn, stride_zn,
                B: gl.constexpr, ASYM: gl.constexpr, SILU: gl.constexpr, EVEN: gl.constexpr, BLOCK_N: gl.constexpr,
                BLOCK_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """float32 (BLOCK_N, BLOCK_M) accumulator in the MMA layout: W[rows] @ x[off_m : off_m + BLOCK_M]^T, rows
    r0 .. r0 + BLOCK_N, or with SILU the gate rows r0 .. r0 + BLOCK_N / 2 then the same rows of up (+ N_OUT)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    # W: one thread a 16-byte chunk of a 4-row group (8 threads cover a group's 32 words of a K tile): 4 words,
    # one a row (QL); dequantized, [g, j, k] (V3)
    QL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8],
                                        warps_per_cta=[num_warps, 1], order=[1, 0])
    V3: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4, 8], threads_per_warp=[4, 1, 8],
                                        warps_per_cta=[num_warps, 1, 1], order=[2, 1, 0])
    D: gl.constexpr = STAGES - 2  # tiles in flight ahead of the one being multiplied
    G: gl.constexpr = BLOCK_N // 4

    g0 = r0 // 4
    gu = (r0 + N_OUT) // 4  # the up rows' groups (N_OUT is a multiple of 4)
    rmask, gsc, gzr = _row_groups(r0, N_OUT, stride_sn, stride_zn, G, SILU, V3)

    for j in gl.static_range(D):  # prologue: tiles 0 .. D - 1 in flight
        if j < NK:
            _tma_tiles(x_desc, w_desc, xs, wq, bars, j, off_m, g0, gu, SILU, STAGES)
    sc = _scales(s_ptr, z_ptr, gsc, gzr, rmask, 0, B, ASYM, EVEN, V3)
    one = _one_bits(N_OUT)

    # tile 0, peeled: the accumulator's first value comes from a wgmma (use_acc=False); zeros flowing past a
    # zero-trip loop into the last wait make ptxas serialize every wgmma (its info C7515, PERF.md attempt 61)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    acc, sc = _step(s_ptr, z_ptr, x_desc, w_desc, xs, wq, ws, bars, 0, NK, acc, sc, one, gsc, gzr, rmask, off_m, g0,
                    gu, B, ASYM, SILU, EVEN, STAGES, QL, V3, False)
    for t in range(1, NK):
        acc, sc = _step(s_ptr, z_ptr, x_desc, w_desc, xs, wq, ws, bars, t, NK, acc, sc, one, gsc, gzr, rmask, off_m,
                        g0, gu, B, ASYM, SILU, EVEN, STAGES, QL, V3, True)
    acc = warpgroup_mma_wait(0, deps=[acc])
    return acc


@gluon.constexpr_function
def _reinterpret_name():
    """shared_memory_descriptor.reinterpret from triton 3.7 on, _reinterpret before."""
    from triton.experimental.gluon.language._core import shared_memory_descriptor
    return "new" if hasattr(shared_memory_descriptor, "reinterpret") else "old"


@gluon.jit
def _store_tile(acc, xs, bias_ptr, y_ptr, r0, off_m, M, N_OUT, stride_ym, HAS_BIAS: gl.constexpr, SILU: gl.constexpr,
                BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, EVEN: gl.constexpr,
                num_warps: gl.constexpr):
    """The epilogue: acc (BLOCK_N, BLOCK_M) float32 is a y^T tile (output rows x tokens; with SILU its first
    BLOCK_N / 2 rows gate, the rest the same rows of up) -> y[off_m :, r0 :] (+ bias, or silu(gate) * up), stored
    along n (contiguous in y), 8 outputs a thread. xs: the x buffers, free now (every wgmma has retired)."""
    NR: gl.constexpr = BLOCK_N // 2 if SILU else BLOCK_N  # output rows
    TN: gl.constexpr = NR // 8 if NR // 8 < 32 else 32
    YL: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[TN, 32 // TN],
                                        warps_per_cta=[1, num_warps], order=[0, 1])
    if SILU:
        # gate rows are the accumulator's first half (the first warpgroup's), up rows the second: through
        # shared memory (the x buffers) to pair them up
        gl.static_assert(STAGES * 64 * 2 >= BLOCK_N * 4, "the x buffers must hold the float32 accumulator")
        _cta_barrier()
        EL: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
        if _reinterpret_name() == "new":
            buf = xs.reinterpret(gl.float32, [BLOCK_N, BLOCK_M], EL)
        else:
            buf = xs._reinterpret(gl.float32, [BLOCK_N, BLOCK_M], EL)
        buf.store(acc)
        _cta_barrier()
        gate = buf.slice(0, NR).load(YL)
        up = buf.slice(NR, NR).load(YL)
        out = gate / (1.0 + gl.exp(-gate)) * up
    else:
        out = gl.convert_layout(acc, YL)
    rows = r0 + gl.arange(0, NR, layout=gl.SliceLayout(1, YL))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, YL))
    _store_rows(out, rows, offs_m, bias_ptr, y_ptr, M, N_OUT, stride_ym, HAS_BIAS, EVEN)


@gluon.jit
def _store_rows(out, rows, toks, bias_ptr, y_ptr, M, N_OUT, stride_ym, HAS_BIAS: gl.constexpr, EVEN: gl.constexpr):
    """out (rows, tokens) float32, a y^T tile -> y[toks, rows] (+ bias[rows]), masked unless EVEN."""
    DT: gl.constexpr = y_ptr.dtype.element_ty
    if HAS_BIAS:
        out += gl.load(bias_ptr + rows, mask=rows < N_OUT, other=0.0).to(gl.float32)[:, None]
    yp = y_ptr + toks[None, :] * stride_ym + rows[:, None]
    if EVEN:
        gl.store(yp, out.to(DT))
    else:
        gl.store(yp, out.to(DT), mask=(rows < N_OUT)[:, None] & (toks < M)[None, :])


@gluon.jit
def gemm_il4_wg_kernel(
    # x (M, K) and the packed il4 W viewed as (N / 4, K / 2) int32 words, as TMA descriptors (blocks (BLOCK_M, 64)
    # and (BLOCK_N / 4, 32)); scales, zeros (N, K/B) il4; bias (N_OUT,) or dummy; y (M, N_OUT)
    x_desc, w_desc, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N_OUT, stride_sn, stride_zn, stride_ym,
    B: gl.constexpr, ASYM: gl.constexpr, HAS_BIAS: gl.constexpr, SILU: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, EVEN: gl.constexpr,
    num_warps: gl.constexpr,
):
    """One tile of y^T per program: BLOCK_N output rows x BLOCK_M tokens, or with SILU (rows [0, N_OUT) of W are
    gate, [N_OUT, 2 N_OUT) up, y = silu(gate) * up) BLOCK_N / 2 output rows, whose gate and up rows make up the
    BLOCK_N rows of the MMA, so gate+up runs at BLOCK_M = 256 with one accumulator. EVEN: M and N_OUT are whole
    tiles (no masks)."""
    DT: gl.constexpr = x_desc.dtype
    NR: gl.constexpr = BLOCK_N // 2 if SILU else BLOCK_N  # output rows a program
    r0 = gl.program_id(0) * NR
    off_m = gl.program_id(1) * BLOCK_M
    NK = x_desc.shape[1] // 64
    xs = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, 64], x_desc.layout)
    wq = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N // 4, 32], w_desc.layout)
    WS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ws = gl.allocate_shared_memory(DT, [2, BLOCK_N, 64], WS)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    acc = _gemm_tiles(x_desc, w_desc, s_ptr, z_ptr, xs, wq, ws, bars, r0, N_OUT, off_m, NK, stride_sn, stride_zn,
                      B, ASYM, SILU, EVEN, BLOCK_N, BLOCK_M, STAGES, num_warps)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    _store_tile(acc, xs, bias_ptr, y_ptr, r0, off_m, M, N_OUT, stride_ym, HAS_BIAS, SILU, BLOCK_N, BLOCK_M, STAGES,
                EVEN, num_warps)


# ---- warp-specialized variant: dequantization in its own warps; tiles split between programs where it pays ----
# gemm_il4_wg_kernel's eight warps dequantize a tile, fence, meet at CTA barriers and only then issue its
# wgmmas: a K step of 128 x 256 x 64 took ~1650 cycles for ~1024 of MMA (PERF.md attempt 66). Here the warps
# are split by task (gl.warp_specialize), and the tensor cores only wait when the dequantization falls behind:
#   - the default partition (num_warps, 2 warpgroups at BLOCK_N = 128) waits for a dequantized W tile and an x
#     tile, issues the wgmmas, and once step n - 1's have retired frees its W buffer and issues the TMA loads of
#     x and packed W into the buffers step n - 1 used; at the end of a tile's steps, the epilogue;
#   - the dequantization partition (DQ_WARPS warps) turns packed W tiles into bf16 W tiles in a ring of WSTAGES
#     buffers; scales by plain loads two steps ahead.
# No partition of its own for the loads: 8 + 4 warps leave 168 registers a thread (65536 / 384), which the MMA
# warps' 64 x 256 float32 accumulator needs; ptxas allocates every partition under the kernel's one limit. The
# loads are not issued by the dequantizing warps either: triton would put a proxy fence (a MEMBAR, which waits
# for the scale loads in flight) before each TMA there.
# The hand-offs are mbarriers (x and packed W: the TMA's bytes; a W tile ready: the dequantization's arrival; a
# W buffer free: the MMA partition's). An arrival comes from one thread, after a barrier of its partition's warps.
#
# The work is the K steps of a run of tiles (from TILE0), tile-major: T = tiles x NK steps, program p taking steps
# [p T / P, (p + 1) T / P). With P = tiles each program has one whole tile (data-parallel). With more programs
# than tiles a tile is split between programs: its parts are summed in float32 in a workspace slot (atomic
# adds); the program that arrives last at the slot's counter reads the sum, resets slot and counter for the
# next call, and stores the tile. Nobody waits for anybody, so it cannot deadlock. The launcher (ops._launch)
# runs the whole waves of tiles one program a tile, then the tiles left over (7B qkv: 144 tiles = one wave of
# 132 and 12) split a few ways, so that they do not make a second wave of 12 SMs. Spreading every tile over one
# program a SM (stream-K proper) measured slower: each program adds ~2 partial tiles of 128 KB (PERF.md 71).


@gluon.jit
def _sk_step(it, NK, MT, NR: gl.constexpr, BLOCK_M: gl.constexpr):
    """Step it -> (its tile's K tile kt, the tile's first output row r0, its first token off_m). Tiles go token
    tile fastest, so the programs reading a row tile's weights run at the same time (L2 serves the rest)."""
    tile = it // NK
    kt = it - tile * NK
    rt = tile // MT
    return kt, rt * NR, (tile - rt * MT) * BLOCK_M


@gluon.jit
def _sk_next(kt, r0, off_m, NK, MT, NR: gl.constexpr, BLOCK_M: gl.constexpr):
    """The step after (kt, r0, off_m) of _sk_step, without its divisions (a division by a runtime value is ~20
    instructions; the loops advance their cursors with this instead)."""
    kt = kt + 1
    wrap = kt == NK
    kt = gl.where(wrap, 0, kt)
    off_m = gl.where(wrap, off_m + BLOCK_M, off_m)
    wrap = off_m == MT * BLOCK_M
    return kt, gl.where(wrap, r0 + NR, r0), gl.where(wrap, 0, off_m)


@gluon.jit
def _sk_owner(i, P, T):
    """The program whose steps include step i: the largest p with p T // P <= i."""
    return ((i + 1).to(gl.int64) * P - 1) // T


@gluon.jit
def _sk_dequant(s_ptr, z_ptr, wq, ws, q_ready, w_ready, w_empty, start, end, NK, MT, N_OUT, stride_sn, stride_zn,
                B: gl.constexpr, ASYM: gl.constexpr, SILU: gl.constexpr, EVEN: gl.constexpr, BLOCK_M: gl.constexpr,
                KNOCK: gl.constexpr):
    """Packed W tile of step it (buffer n % QSTAGES, n = it - start) -> dequantized W tile in ws[n % WSTAGES], once
    the wgmmas of step n - WSTAGES have retired. A thread dequantizes 16-byte il4 chunks (4 rows x 8 k). With
    SILU the tile's rows are stored so that a gate row and its up row land 8 rows apart in a 16-row block (the
    wgmma accumulator's thread holds rows i and i + 8): the epilogue pairs them in registers."""
    NW: gl.constexpr = gl.num_warps()
    QS: gl.constexpr = wq.shape[0]
    WST: gl.constexpr = ws.shape[0]
    G: gl.constexpr = wq.shape[1]
    NR: gl.constexpr = 2 * G if SILU else 4 * G  # output rows a tile
    DT: gl.constexpr = ws.dtype
    QL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8], warps_per_cta=[NW, 1],
                                        order=[1, 0])
    V3: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4, 8], threads_per_warp=[4, 1, 8],
                                        warps_per_cta=[NW, 1, 1], order=[2, 1, 0])
    # scales two steps ahead, loaded right after a step's fence: the fence (fence.proxy.async is MEMBAR.ALL.CTA
    # + FENCE.VIEW.ASYNC in SASS) waits for every load of the thread still in flight, so loads issued just
    # before it would put their whole latency on this partition's path each step. (kt2, r02, m2): step it + 2,
    # clamped to the last step; its tile's row groups are worked out again only when the tile changes.
    kt2, r02, m2 = _sk_step(start, NK, MT, NR, BLOCK_M)
    rmask, gsc, gzr = _row_groups(r02, N_OUT, stride_sn, stride_zn, G, SILU, V3)
    sc = _scales(s_ptr, z_ptr, gsc, gzr, rmask, kt2, B, ASYM, EVEN, V3)
    kt2, r02, m2 = _sk_step(gl.minimum(start + 1, end - 1), NK, MT, NR, BLOCK_M)
    rmask, gsc, gzr = _row_groups(r02, N_OUT, stride_sn, stride_zn, G, SILU, V3)
    scn = _scales(s_ptr, z_ptr, gsc, gzr, rmask, kt2, B, ASYM, EVEN, V3)
    one = _one_bits(N_OUT)
    for it in range(start, end):
        n = it - start
        i = n % QS
        j = n % WST
        mbarrier.wait(q_ready.index(i), (n // QS) & 1)
        if KNOCK != 1:
            q = wq.index(i).load(QL)
            v = _dequant(q, sc, one, ASYM, DT, V3)                       # (4 G, 64), rows as loaded
            if SILU:  # rows [h, b, q, j] (h: gate/up, 4-row group 2 b + q) -> [b, h, q, j]: 16 b + 8 h + 4 q + j
                v = gl.reshape(gl.permute(gl.reshape(v, [2, G // 4, 2, 4, 64]), [1, 0, 2, 3, 4]), [4 * G, 64])
        mbarrier.wait(w_empty.index(j), ((n // WST) & 1) ^ 1)  # a fresh barrier passes parity 1
        if KNOCK != 1:
            ws.index(j).store(v)
        if KNOCK != 3:
            fence_async_shared()  # the stores, before the wgmmas (async proxy) read them
        _cta_barrier()
        mbarrier.arrive(w_ready.index(j), count=1)
        if KNOCK != 4:
            sc = scn
            if it + 2 < end:
                kt2, r02, m2 = _sk_next(kt2, r02, m2, NK, MT, NR, BLOCK_M)
                if kt2 == 0:
                    rmask, gsc, gzr = _row_groups(r02, N_OUT, stride_sn, stride_zn, G, SILU, V3)
            scn = _scales(s_ptr, z_ptr, gsc, gzr, rmask, kt2, B, ASYM, EVEN, V3)


@gluon.jit
def _sk_loads(x_desc, w_desc, xs, wq, x_ready, q_ready, n, kt, r0, off_m, N_OUT, SILU: gl.constexpr, DO_X, DO_W):
    """TMA loads of this program's step n (K tile kt of the tile at output row r0, token off_m) into buffer
    n % STAGES (x, if DO_X) and n % QSTAGES (packed W, if DO_W): x[off_m :, 64 kt :]; the packed W tile kt of the
    tile's row groups (with SILU: half from the gate rows, half from the same rows of up)."""
    if DO_X:
        i = n % xs.shape[0]
        mbarrier.expect(x_ready.index(i), x_desc.block_type.nbytes)
        _tma_load(x_desc, [off_m, kt * 64], x_ready.index(i), xs.index(i))
    if DO_W:
        i = n % wq.shape[0]
        GB: gl.constexpr = w_desc.block_type.shape[0]
        NB: gl.constexpr = wq.shape[1] * wq.shape[2] * 4  # bytes a tile (with SILU: two loads of half that)
        mbarrier.expect(q_ready.index(i), NB)
        if SILU:
            _tma_load(w_desc, [r0 // 4, kt * 32], q_ready.index(i), wq.index(i).slice(0, GB))
            _tma_load(w_desc, [(r0 + N_OUT) // 4, kt * 32], q_ready.index(i), wq.index(i).slice(GB, GB))
        else:
            _tma_load(w_desc, [r0 // 4, kt * 32], q_ready.index(i), wq.index(i))


@gluon.jit
def _sk_chunks(acc):
    """acc (BN, BM) in the wgmma layout -> its 4 column quarters (BN, BM / 4), tokens [c BM / 4, (c + 1) BM / 4):
    the same registers, renamed (a thread's columns 8 i + 2 (lane % 4) + j: the quarter is i's top two bits)."""
    BN: gl.constexpr = acc.shape[0]
    BM: gl.constexpr = acc.shape[1]
    # [row, h, g, q] (column 128 h + 64 g + q) -> [row, q, h, g]; split g, then h
    e, o = gl.split(gl.permute(gl.reshape(acc, [BN, 2, 2, BM // 4]), [0, 3, 1, 2]))
    a0, a2 = gl.split(e)
    a1, a3 = gl.split(o)
    return a0, a1, a2, a3


@gluon.jit
def _sk_store(acc, bias_ptr, y_ptr, r0, off_m, M, N_OUT, stride_ym, HAS_BIAS: gl.constexpr, SILU: gl.constexpr,
              EVEN: gl.constexpr):
    """A column quarter of the accumulator (_sk_chunks; (BN, BQ) float32, a y^T tile: with SILU, rows 16 b + i
    gate and 16 b + 8 + i up of output row r0 + 8 b + i) -> y[off_m : off_m + BQ, r0 :], stored straight from the
    registers (no shared memory: the x and W rings are in use by the next tile's loads). A quarter at a time and
    indices by broadcasting, so that the epilogue needs few registers beside the accumulator's 128."""
    BN: gl.constexpr = acc.shape[0]
    BQ: gl.constexpr = acc.shape[1]
    DT: gl.constexpr = y_ptr.dtype.element_ty
    if SILU:
        # [b, h, i, token] -> gate (h = 0) and up (h = 1), each [b, i, token]: the same registers, renamed
        gate, up = gl.split(gl.permute(gl.reshape(acc, [BN // 16, 2, 8, BQ]), [0, 2, 3, 1]))
        out = gate / (1.0 + gl.exp(-gate)) * up
        L3: gl.constexpr = out.type.layout
        b = gl.arange(0, BN // 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        i = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
        t = off_m + gl.arange(0, BQ, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        r = r0 + 8 * b[:, None] + i[None, :]                              # [b, i] output rows
        yp = y_ptr + t[None, None, :] * stride_ym + r[:, :, None]
        if EVEN:
            gl.store(yp, out.to(DT))
        else:
            gl.store(yp, out.to(DT), mask=(r < N_OUT)[:, :, None] & (t < M)[None, None, :])
    else:
        L: gl.constexpr = acc.type.layout
        r = r0 + gl.arange(0, BN, layout=gl.SliceLayout(1, L))
        t = off_m + gl.arange(0, BQ, layout=gl.SliceLayout(0, L))
        _store_rows(acc, r, t, bias_ptr, y_ptr, M, N_OUT, stride_ym, HAS_BIAS, EVEN)


@gluon.jit
def _sk_epilogue(acc, bias_ptr, y_ptr, r0, off_m, M, N_OUT, stride_ym, HAS_BIAS: gl.constexpr, SILU: gl.constexpr,
                 EVEN: gl.constexpr):
    """The tile's output from acc, a column quarter at a time (_sk_store)."""
    BQ: gl.constexpr = acc.shape[1] // 4
    a0, a1, a2, a3 = _sk_chunks(acc)
    _sk_store(a0, bias_ptr, y_ptr, r0, off_m, M, N_OUT, stride_ym, HAS_BIAS, SILU, EVEN)
    _sk_store(a1, bias_ptr, y_ptr, r0, off_m + BQ, M, N_OUT, stride_ym, HAS_BIAS, SILU, EVEN)
    _sk_store(a2, bias_ptr, y_ptr, r0, off_m + 2 * BQ, M, N_OUT, stride_ym, HAS_BIAS, SILU, EVEN)
    _sk_store(a3, bias_ptr, y_ptr, r0, off_m + 3 * BQ, M, N_OUT, stride_ym, HAS_BIAS, SILU, EVEN)


@gluon.jit
def _sk_mma(x_desc, w_desc, xs, wq, ws, x_ready, q_ready, w_ready, w_empty, bias_ptr, y_ptr, part_ptr, cnt_ptr,
            base, start, end, T, NK, MT, M, N_OUT, stride_ym, SILU: gl.constexpr, HAS_BIAS: gl.constexpr,
            EVEN: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, KNOCK: gl.constexpr,
            num_warps: gl.constexpr):
    """The default partition: for each step, W tile @ x tile^T into the float32 accumulator, one wgmma group in
    flight beside the one being issued; it also issues the TMA loads (once step n - 1's wgmmas have retired, the
    dequantization has long read step n - 1's packed tile too: it wrote W tile n - 1 from it before arriving on
    w_ready), and at the last step of each tile the epilogue, or the tile's partial sum into the workspace."""
    ST: gl.constexpr = xs.shape[0]
    QS: gl.constexpr = wq.shape[0]
    WST: gl.constexpr = ws.shape[0]
    NR: gl.constexpr = BLOCK_N // 2 if SILU else BLOCK_N
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    P = gl.num_programs(0)
    # prologue: the first QS packed W tiles and ST x tiles in flight; (kw, rw, mw) and (kx, rx, mx): the steps
    # whose loads come next, advanced by _sk_next (no divisions in the loop)
    kw, rw, mw = _sk_step(start, NK, MT, NR, BLOCK_M)
    kx, rx, mx = kw, rw, mw
    for j in gl.static_range(QS if QS > ST else ST):
        if start + j < end:
            if j < QS:
                _sk_loads(x_desc, w_desc, xs, wq, x_ready, q_ready, j, kw, rw, mw, N_OUT, SILU, False, True)
                kw, rw, mw = _sk_next(kw, rw, mw, NK, MT, NR, BLOCK_M)
            if j < ST:
                _sk_loads(x_desc, w_desc, xs, wq, x_ready, q_ready, j, kx, rx, mx, N_OUT, SILU, True, False)
                kx, rx, mx = _sk_next(kx, rx, mx, NK, MT, NR, BLOCK_M)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    kt, r0, off_m = _sk_step(start, NK, MT, NR, BLOCK_M)
    for it in range(start, end):
        n = it - start
        mbarrier.wait(w_ready.index(n % WST), (n // WST) & 1)
        mbarrier.wait(x_ready.index(n % ST), (n // ST) & 1)
        if KNOCK != 2:
            # the first step of a tile (or of this program's share of it) starts the sum: use_acc False, so no
            # zeros are written into the accumulator outside a wgmma (ptxas would serialize the wgmmas, C7515)
            acc = warpgroup_mma(ws.index(n % WST), xs.index(n % ST).permute((1, 0)), acc,
                                use_acc=(kt != 0) & (it != start), is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])  # this warpgroup's step n - 1 retired
        _cta_barrier()                               # and the other's: step n - 1's buffers are free
        if n > 0:
            mbarrier.arrive(w_empty.index((n - 1) % WST), count=1)
            if it - 1 + QS < end:  # step n - 1 + QS's packed W, and n - 1 + ST's x
                _sk_loads(x_desc, w_desc, xs, wq, x_ready, q_ready, n - 1 + QS, kw, rw, mw, N_OUT, SILU, False, True)
                kw, rw, mw = _sk_next(kw, rw, mw, NK, MT, NR, BLOCK_M)
            if it - 1 + ST < end:
                _sk_loads(x_desc, w_desc, xs, wq, x_ready, q_ready, n - 1 + ST, kx, rx, mx, N_OUT, SILU, True, False)
                kx, rx, mx = _sk_next(kx, rx, mx, NK, MT, NR, BLOCK_M)
        if (kt == NK - 1) | (it == end - 1):  # the last step of this tile here
            acc = warpgroup_mma_wait(0, deps=[acc])
            if (it - kt >= start) & (kt == NK - 1):  # a whole tile: store it (the last one after the loop)
                if it != end - 1:
                    _sk_epilogue(acc, bias_ptr, y_ptr, r0, off_m, M, N_OUT, stride_ym, HAS_BIAS, SILU, EVEN)
            else:  # part of it: add into the tile's slot; the last of its programs to arrive stores the sum
                first_p = _sk_owner(it - kt - base, P, T)  # it - kt: the tile's first step
                parts = _sk_owner(it - kt - base + NK - 1, P, T) - first_p + 1
                rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
                cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
                slot = part_ptr + first_p * (BLOCK_N * BLOCK_M) + rows[:, None] * BLOCK_M + cols[None, :]  # acc's layout
                gl.atomic_add(slot, acc, sem="relaxed")
                _cta_barrier()  # every thread's adds, before the counter (release) says they are done
                arrived = gl.atomic_add(cnt_ptr + first_p, 1, sem="acq_rel")
                if arrived == parts - 1:
                    # the sum into acc's own registers (a second tile of registers would spill; the next step
                    # starts a new sum with use_acc False)
                    acc = gl.load(slot, cache_modifier=".cg")
                    gl.store(slot, gl.zeros_like(acc))  # the slot and counter clean for the next call
                    gl.store(cnt_ptr + first_p, 0)
                    _sk_epilogue(acc, bias_ptr, y_ptr, r0, off_m, M, N_OUT, stride_ym, HAS_BIAS, SILU, EVEN)
        kt, r0, off_m = _sk_next(kt, r0, off_m, NK, MT, NR, BLOCK_M)
    # the program's last tile, when it has the whole of it, after the loop: there the accumulator is dead once
    # stored, and the epilogue's registers do not spill (in the loop it stays live for the next step)
    kt, r0, off_m = _sk_step(end - 1, NK, MT, NR, BLOCK_M)
    if (end > start) & (kt == NK - 1) & (end - 1 - kt >= start):
        _sk_epilogue(acc, bias_ptr, y_ptr, r0, off_m, M, N_OUT, stride_ym, HAS_BIAS, SILU, EVEN)


@gluon.jit
def gemm_il4_ws_kernel(
    # as gemm_il4_wg_kernel, plus the stream-K workspace: part (P, BLOCK_N, BLOCK_M) float32 and cnt (P,) int32,
    # zeros before the first call (every call leaves them so); the tiles from TILE0 on, T steps in all (tiles x K
    # tiles); MT: token tiles
    x_desc, w_desc, s_ptr, z_ptr, bias_ptr, y_ptr, part_ptr, cnt_ptr,
    M, N_OUT, stride_sn, stride_zn, stride_ym, T, MT, TILE0,
    B: gl.constexpr, ASYM: gl.constexpr, HAS_BIAS: gl.constexpr, SILU: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, QSTAGES: gl.constexpr,
    WSTAGES: gl.constexpr, DQ_WARPS: gl.constexpr, DQ_REGS: gl.constexpr, EVEN: gl.constexpr,
    num_warps: gl.constexpr, KNOCK: gl.constexpr = 0,
):
    """gemm_il4_wg_kernel's product with its work split among warp-specialized partitions and its steps spread
    evenly over the programs (above). STAGES x buffers, QSTAGES packed W buffers, WSTAGES dequantized W buffers;
    DQ_WARPS warps dequantize, with DQ_REGS registers a thread (the MMA warps get the rest of the kernel's
    maxnreg budget). KNOCK (benchmarks/ws_knockout.py only; the result is wrong unless 0): leave one stage out to
    time the rest. 1: no dequantization (the W ring is handed on unwritten), 2: no wgmma, 3: no proxy fence after
    the W stores, 4: the scales of the first step for every step (no scale loads in the loop)."""
    DT: gl.constexpr = x_desc.dtype
    P = gl.num_programs(0)
    pid = gl.program_id(0)
    NK = x_desc.shape[1] // 64
    base = TILE0 * NK  # steps are numbered over all tiles; this launch has T of them from base
    start = base + ((pid.to(gl.int64) * T) // P).to(gl.int32)
    end = base + (((pid + 1).to(gl.int64) * T) // P).to(gl.int32)
    xs = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, 64], x_desc.layout)
    wq = gl.allocate_shared_memory(gl.int32, [QSTAGES, BLOCK_N // 4, 32], w_desc.layout)
    WS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ws = gl.allocate_shared_memory(DT, [WSTAGES, BLOCK_N, 64], WS)
    # one allocation a ring, so that the compiler's barrier analysis sees them apart
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [QSTAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [WSTAGES, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [WSTAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(i), count=1)
    for i in gl.static_range(QSTAGES):
        mbarrier.init(q_ready.index(i), count=1)
    for i in gl.static_range(WSTAGES):
        mbarrier.init(w_ready.index(i), count=1)
        mbarrier.init(w_empty.index(i), count=1)
    gl.warp_specialize([
        (_sk_mma, (x_desc, w_desc, xs, wq, ws, x_ready, q_ready, w_ready, w_empty, bias_ptr, y_ptr, part_ptr,
                   cnt_ptr, base, start, end, T, NK, MT, M, N_OUT, stride_ym, SILU, HAS_BIAS, EVEN, BLOCK_N, BLOCK_M, KNOCK,
                   num_warps)),
        (_sk_dequant, (s_ptr, z_ptr, wq, ws, q_ready, w_ready, w_empty, start, end, NK, MT, N_OUT, stride_sn,
                       stride_zn, B, ASYM, SILU, EVEN, BLOCK_M, KNOCK)),
    ], [DQ_WARPS], [DQ_REGS])


def descriptors(x2, qweight, block_n: int, block_m: int, silu: bool = False):
    """The kernel's TMA descriptors: x (M, K) in (BLOCK_M, 64) blocks, 128-byte swizzle (wgmma's B operand), and
    the packed il4 weight as (N / 4, K / 2) int32 words (a 4-row group's K tile is 32 contiguous words) in
    (BLOCK_N / 4, 32) blocks (half that with SILU: gate and up rows come as two loads), unswizzled (the threads
    read 16-byte chunks). The launcher checks alignment first (ops._wg_applies)."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    n, kb = qweight.shape
    xd = TensorDescriptor(x2, list(x2.shape), [x2.stride(0), 1], [block_m, 64], X_LAYOUT)
    gb = block_n // 8 if silu else block_n // 4
    wd = TensorDescriptor(qweight.view(n // 4, 4 * kb).view(torch.int32), [n // 4, kb], [kb, 1], [gb, 32], W_LAYOUT)
    return xd, wd
