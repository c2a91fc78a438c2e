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
Each thread reads one 16-byte il4 chunk of a K tile (4 rows x 8 k) with one load, and x comes by cp.async,
STAGES buffers, STAGES - 2 tiles ahead.

Limits (the launcher checks them and otherwise uses gemm.py): int4_sym or int4_asym in "il4", bf16 or fp16
activations, K a multiple of 64 and quantization blocks of 64 k or more, sm_90. Gluon has no interpreter: the
tests run it on the GPU, and compile it for sm_90 offline on the CPU.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

# cp.async into shared memory: async_load from triton 3.7 on, async_copy_global_to_shared before (the device's
# 3.6); the kernel compiles on both (tests/test_compile_sm90.py runs on CI's triton)
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

# a CTA barrier: gl.barrier from triton 3.7 on, gl.thread_barrier before
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

BLOCK_K = 64  # k per tile: four k16 wgmma slices, one scale per row (quant blocks are >= 64 k)


@gluon.jit
def _w_tile(w_ptr, s_ptr, z_ptr, goff, gsc, gzr, rmask, kt, B: gl.constexpr, ASYM: gl.constexpr,
            EVEN: gl.constexpr, QL: gl.constexpr, V3: gl.constexpr):
    """K tile kt of BLOCK_N rows in il4 order: packed bytes uint8 (BLOCK_N / 4, 128) in QL, element [g, e] =
    byte e % 4 of row 4 g + (e // 4) % 4 at byte column 4 (e // 16) + e % 4 of the tile (16 bytes are one word
    column of a 4-row group, read by one thread in one load); and per row the scale s and the offset c = -zero *
    s, float32 (BLOCK_N / 4, 4) [g, j] in SliceLayout(2, V3), so that w = value * s + c. goff/gsc/gzr: the
    groups' offsets (BLOCK_N / 4,); scales and zeros [n, b] of il4 sit at (n // 4) * 4 * stride + 4 b + n % 4."""
    e = gl.arange(0, 128, layout=gl.SliceLayout(0, QL))
    off = gl.convert_layout(goff, gl.SliceLayout(1, QL), assert_trivial=True)[:, None] + (kt * 128 + e)[None, :]
    SL: gl.constexpr = gl.SliceLayout(2, V3)
    j = gl.arange(0, 4, layout=gl.SliceLayout(0, SL))
    b4 = (kt * 64) // B * 4
    if EVEN:
        q = gl.load(w_ptr + off)
        s = gl.load(s_ptr + gsc[:, None] + b4 + j[None, :]).to(gl.float32)
    else:
        q = gl.load(w_ptr + off, mask=gl.convert_layout(rmask, gl.SliceLayout(1, QL), assert_trivial=True)[:, None], other=0)
        s = gl.load(s_ptr + gsc[:, None] + b4 + j[None, :], mask=rmask[:, None], other=0.0).to(gl.float32)
    if ASYM:
        if EVEN:
            z = gl.load(z_ptr + gzr[:, None] + b4 + j[None, :]).to(gl.float32)
        else:
            z = gl.load(z_ptr + gzr[:, None] + b4 + j[None, :], mask=rmask[:, None], other=0).to(gl.float32)
        c = -z * s
    else:
        c = -8.0 * s
    return q, s, c


@gluon.jit
def _dequant(q, s, c, ASYM: gl.constexpr, DT: gl.constexpr, Q3: gl.constexpr, V3: gl.constexpr):
    """uint8 (G, 128) and per-row s, c (G, 4) -> DT (4 G, 64), rows and k in order. Integers become floats
    through the exponent trick (dequant.py): (0x4B000000 | u) as float32 is 2**23 + u. The reshapes only
    rename registers (asserted): a thread keeps its 16 bytes, 4 rows x 8 k."""
    G: gl.constexpr = q.shape[0]
    q = gl.reshape(q, [G, 8, 4, 4])                                     # [g, word column w, row j, byte]
    q = gl.convert_layout(gl.reshape(gl.permute(q, [0, 2, 1, 3]), [G, 4, 32]), Q3, assert_trivial=True)
    q32 = q.to(gl.int32)
    if not ASYM:
        q32 = q32 ^ 0x88  # two's complement nibbles n -> n + 8 in [0, 15]
    lo = ((q32 & 0xF) | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
    hi = (((q32 >> 4) & 0xF) | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
    v = gl.convert_layout(gl.reshape(gl.join(lo, hi), [G, 4, 64]), V3, assert_trivial=True)  # [g, j, k]
    v = v * s[:, :, None] + c[:, :, None]
    return gl.reshape(v.to(DT), [4 * G, 64])


@gluon.jit
def _x_copy(xs, x_ptr, offs_m, mmask, offs_k, kt, stride_xm, STAGES: gl.constexpr, EVEN: gl.constexpr):
    """cp.async x[offs_m, 64 kt : 64 kt + 64] into buffer kt % STAGES (rows past M are zero-filled)."""
    ptrs = x_ptr + offs_m[:, None] * stride_xm + (kt * 64 + offs_k)[None, :]
    if EVEN:
        _cp_async(xs.index(kt % STAGES), ptrs)
    else:
        _cp_async(xs.index(kt % STAGES), ptrs, mask=mmask[:, None])


@gluon.jit
def _step(x_ptr, w_ptr, s_ptr, z_ptr, xs, ws, t, NK, acc, up, q, s, c, qu, su, cu, goff, gsc, gzr, rmask, uw, us,
          uz, offs_m, mmask, offs_k, stride_xm, B: gl.constexpr, ASYM: gl.constexpr, SILU: gl.constexpr,
          EVEN: gl.constexpr, STAGES: gl.constexpr, QL: gl.constexpr, Q3: gl.constexpr, V3: gl.constexpr,
          USE_ACC: gl.constexpr):
    """K tile t: store the dequantized W tile (registers q, s, c; with SILU also the up rows' qu, su, cu), load
    the next one, issue the wgmmas, and wait until only this tile's are in flight."""
    DT: gl.constexpr = x_ptr.dtype.element_ty
    D: gl.constexpr = STAGES - 2
    H: gl.constexpr = 2 if SILU else 1
    # W tile t into buffer t % 2: the wgmmas that read it last (tile t - 2) retired at this warpgroup's wait in
    # step t - 1, and each warpgroup reads only the rows its own warps write
    tn = gl.minimum(t + 1, NK - 1)  # the next tile (a harmless reload of the last one at the end)
    ws.index(H * (t % 2)).store(_dequant(q, s, c, ASYM, DT, Q3, V3))
    q, s, c = _w_tile(w_ptr, s_ptr, z_ptr, goff, gsc, gzr, rmask, tn, B, ASYM, EVEN, QL, V3)
    if SILU:
        ws.index(H * (t % 2) + 1).store(_dequant(qu, su, cu, ASYM, DT, Q3, V3))
        qu, su, cu = _w_tile(w_ptr + uw, s_ptr + us, z_ptr + uz, goff, gsc, gzr, rmask, tn, B, ASYM, EVEN, QL, V3)
    # x tile t has landed (this thread's copies; the barrier makes it everyone's), and every warpgroup has
    # retired tile t - 2's wgmmas, so x buffer (t + D) % STAGES = (t - 2) % STAGES is free for tile t + D
    async_copy.wait_group(D - 1)
    fence_async_shared()  # the generic-proxy writes above (st.shared, cp.async) before wgmma reads them
    _cta_barrier()
    if t + D < NK:
        _x_copy(xs, x_ptr, offs_m, mmask, offs_k, t + D, stride_xm, STAGES, EVEN)
    async_copy.commit_group()
    xv = xs.index(t % STAGES).permute((1, 0))                            # (64, BLOCK_M), K-major
    acc = warpgroup_mma(ws.index(H * (t % 2)), xv, acc, use_acc=USE_ACC, is_async=True)
    if SILU:
        up = warpgroup_mma(ws.index(H * (t % 2) + 1), xv, up, use_acc=USE_ACC, is_async=True)
        acc, up = warpgroup_mma_wait(2, deps=[acc, up])                  # tile t - 1's two groups retired
    else:
        acc = warpgroup_mma_wait(1, deps=[acc])                          # tile t - 1's group retired
    return acc, up, q, s, c, qu, su, cu


@gluon.jit
def _gemm_tiles(x_ptr, w_ptr, s_ptr, z_ptr, xs, ws, row0, N_OUT, off_m, M, NK, stride_xm, stride_wn, stride_sn,
                stride_zn, B: gl.constexpr, ASYM: gl.constexpr, SILU: gl.constexpr, EVEN: gl.constexpr,
                BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """float32 (BLOCK_N, BLOCK_M) accumulators in the MMA layout: W[row0 : row0 + BLOCK_N] @ x[off_m : off_m +
    BLOCK_M]^T, and with SILU also the up rows' (row0 + N_OUT ...) from the same x tiles (else the first
    again). ws: the dequantized W tiles, 2 buffers (4 with SILU: gate and up)."""
    DT: gl.constexpr = x_ptr.dtype.element_ty
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    # W: one thread a 16-byte chunk of a 4-row group (8 threads cover a group's 128 bytes of a K tile), the
    # same bytes as [g, j, byte column] (Q3) and, dequantized, as [g, j, k] (V3)
    QL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[4, 8],
                                        warps_per_cta=[num_warps, 1], order=[1, 0])
    Q3: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4, 4], threads_per_warp=[4, 1, 8],
                                        warps_per_cta=[num_warps, 1, 1], order=[2, 1, 0])
    V3: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4, 8], threads_per_warp=[4, 1, 8],
                                        warps_per_cta=[num_warps, 1, 1], order=[2, 1, 0])
    # x tiles: 16-byte cp.async chunks, 8 threads along a row's 64 k
    XL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                        warps_per_cta=[num_warps, 1], order=[1, 0])
    D: gl.constexpr = STAGES - 2  # x tiles in flight ahead of the one being multiplied
    H: gl.constexpr = 2 if SILU else 1

    grp = row0 // 4 + gl.arange(0, BLOCK_N // 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, V3)))
    rmask = grp * 4 < N_OUT
    goff = grp * (4 * stride_wn)
    gsc = grp * (4 * stride_sn)
    gzr = grp * (4 * stride_zn)
    # the up rows are N_OUT further (N_OUT is a multiple of 4: no il4 group straddles the halves)
    uw = (N_OUT // 4) * (4 * stride_wn)
    us = (N_OUT // 4) * (4 * stride_sn)
    uz = (N_OUT // 4) * (4 * stride_zn)
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, XL))
    mmask = offs_m < M
    offs_k = gl.arange(0, 64, layout=gl.SliceLayout(0, XL))

    # prologue: x tiles 0 .. D - 1 in flight (one commit group each, empty past the last tile, so that the
    # number of groups in flight is the same every step), W tile 0 in registers
    for i in gl.static_range(D):
        if i < NK:
            _x_copy(xs, x_ptr, offs_m, mmask, offs_k, i, stride_xm, STAGES, EVEN)
        async_copy.commit_group()
    q, s, c = _w_tile(w_ptr, s_ptr, z_ptr, goff, gsc, gzr, rmask, 0, B, ASYM, EVEN, QL, V3)
    if SILU:
        qu, su, cu = _w_tile(w_ptr + uw, s_ptr + us, z_ptr + uz, goff, gsc, gzr, rmask, 0, B, ASYM, EVEN, QL, V3)
    else:  # unused placeholders (scalars, so no registers of a tile are carried through the loop)
        qu, su, cu = 0.0, 0.0, 0.0

    # tile 0, peeled: the accumulators' first values come from wgmmas (use_acc=False); zeros flowing past a
    # zero-trip loop into the last wait make ptxas serialize every wgmma (its info C7515, PERF.md attempt 61)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    if SILU:
        up = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
    else:
        up = 0.0
    acc, up, q, s, c, qu, su, cu = _step(x_ptr, w_ptr, s_ptr, z_ptr, xs, ws, 0, NK, acc, up, q, s, c, qu, su, cu,
                                         goff, gsc, gzr, rmask, uw, us, uz, offs_m, mmask, offs_k, stride_xm, B,
                                         ASYM, SILU, EVEN, STAGES, QL, Q3, V3, False)
    for t in range(1, NK):
        acc, up, q, s, c, qu, su, cu = _step(x_ptr, w_ptr, s_ptr, z_ptr, xs, ws, t, NK, acc, up, q, s, c, qu, su,
                                             cu, goff, gsc, gzr, rmask, uw, us, uz, offs_m, mmask, offs_k,
                                             stride_xm, B, ASYM, SILU, EVEN, STAGES, QL, Q3, V3, True)
    if SILU:
        acc, up = warpgroup_mma_wait(0, deps=[acc, up])
        return acc, up
    acc = warpgroup_mma_wait(0, deps=[acc])
    return acc, acc


@gluon.jit
def gemm_il4_wg_kernel(
    # x (M, K); packed il4 W (N, K/2) bytes; scales, zeros (N, K/B) il4; bias (N_OUT,) or dummy; y (M, N_OUT)
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N_OUT, K, stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    B: gl.constexpr, ASYM: gl.constexpr, HAS_BIAS: gl.constexpr, SILU: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, EVEN: gl.constexpr,
    num_warps: gl.constexpr,
):
    """One (BLOCK_N, BLOCK_M) tile of y^T per program; SILU: rows [0, N_OUT) are gate, [N_OUT, 2 N_OUT) up, and
    y = silu(gate) * up. EVEN: M and N_OUT are whole tiles (no masks)."""
    DT: gl.constexpr = x_ptr.dtype.element_ty
    row0 = gl.program_id(0) * BLOCK_N
    off_m = gl.program_id(1) * BLOCK_M
    NK = K // 64
    SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    xs = gl.allocate_shared_memory(DT, [STAGES, BLOCK_M, 64], SMEM)
    ws = gl.allocate_shared_memory(DT, [4 if SILU else 2, BLOCK_N, 64], SMEM)
    acc, up = _gemm_tiles(x_ptr, w_ptr, s_ptr, z_ptr, xs, ws, row0, N_OUT, off_m, M, NK, stride_xm, stride_wn,
                          stride_sn, stride_zn, B, ASYM, SILU, EVEN, BLOCK_N, BLOCK_M, STAGES, num_warps)
    if SILU:
        acc = acc / (1.0 + gl.exp(-acc)) * up
    # y^T tile: stores along n (contiguous in y), 8 outputs a thread
    TN: gl.constexpr = BLOCK_N // 8 if BLOCK_N // 8 < 32 else 32
    YL: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[TN, 32 // TN],
                                        warps_per_cta=[1, num_warps], order=[0, 1])
    out = gl.convert_layout(acc, YL)
    rows = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, YL))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, YL))
    if HAS_BIAS:
        out += gl.load(bias_ptr + rows, mask=rows < N_OUT, other=0.0).to(gl.float32)[:, None]
    yp = y_ptr + offs_m[None, :] * stride_ym + rows[:, None]
    if EVEN:
        gl.store(yp, out.to(DT))
    else:
        gl.store(yp, out.to(DT), mask=(rows < N_OUT)[:, None] & (offs_m < M)[None, :])
