"""The read floor: how fast one kernel can read a given number of bytes from HBM, timed the way
benchmarks/kernels.py times the GEMVs (a CUDA graph of one call per copy, rotating through enough copies that
L2 cannot serve them, median replay / copies).

Issue 4 asks the M = 1 GEMV for 80% of the copy bandwidth, which is measured on a 2 GB buffer. A GEMV on a 7B
projection reads 6-68 MB, and every kernel pays a fixed launch, DRAM latency, ramp and tail that a 2 GB copy
spreads over 300x the bytes. This kernel does nothing but read (16-byte loads, an xor a word, one int32
written per program), so its time for the GEMV's byte count is what any kernel reading those bytes needs: the
GEMV's time against it separates what the GEMV's own work costs from what the byte count alone costs
(docs/PERF.md round 17).

Each config is timed twice: launched plainly, and with programmatic dependent launch (the loads issued before
the wait, as qrun's GEMVs do), so consecutive calls in the graph overlap one's loads with the other's tail.
The floor is the fastest config of either.

    python3 benchmarks/read_floor.py --mb 2.2,4.4,6.4,8.3,34,68    (GPU only; prints one line per size)
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qrun.kernels.gemv_mma import _gdc  # noqa: E402
from qrun.kernels.pdl import pdl_enabled, pdl_enter  # noqa: E402

ROTATE_BYTES = 200e6  # > 4x the H100's 50 MB L2, as kernels.py
# (words a thread a load round, load rounds a program, warps): one round a program is the most programs and
# the least latency in a chain; more rounds a program is fewer launches of programs (a persistent-ish read)
CONFIGS = [(w, r, nw) for w in (8, 16, 32) for r in (1, 2, 4, 8) for nw in (4, 8)]
# (RG rows, BK words, ROUNDS, warps) walks for --tiles: 64 words = 256 bytes = one 128-k block of a 4-row group
TILE_CONFIGS = [(rg, bk, rounds, nw) for rg in (1, 2, 4, 8, 16) for bk in (64, 256, 512, 2048) for rounds in (1, 2, 4, 8)
                for nw in (4, 8) if 2048 <= rg * bk * rounds <= 32768 and rg * bk <= 8192
                and rg * bk >= 32 * 4 * nw]


@triton.jit
def _read_kernel(src, out, n_words, WORDS: tl.constexpr, ROUNDS: tl.constexpr, PDL: tl.constexpr,
                 num_warps_c: tl.constexpr):
    # src: (n_words,) int32, read once; out: (programs,) int32, the xor of what the program read (so the loads
    # cannot be dropped). A round is one (WORDS x 32 x warps) block, WORDS / 4 16-byte loads a thread.
    BLOCK: tl.constexpr = WORDS * 32 * num_warps_c
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (BLOCK * ROUNDS)
    acc = tl.zeros([BLOCK], tl.int32)
    for r in tl.static_range(ROUNDS):  # unrolled: every round's loads are issued before the first xor
        offs = base + r * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n_words, other=0, cache_modifier=".cg")
    pdl_enter(PDL)  # the weights-like reads above depend on nothing; the write waits for the previous kernel
    tl.store(out + pid, tl.xor_sum(acc, 0))


@triton.jit
def _read_tile_kernel(src, out, ROW_WORDS, RG: tl.constexpr, BK: tl.constexpr, ROUNDS: tl.constexpr,
                      PDL: tl.constexpr):
    # src: (rows, ROW_WORDS) int32, e.g. il4's (N / 4 row groups, 4 rows x K / 8 words); program (pid, sp) reads
    # rows RG pid .. RG pid + RG - 1, words sp (BK ROUNDS) .. (sp + 1) (BK ROUNDS) - 1 of each: a round is an
    # (RG, BK) tile, RG runs of BK contiguous words ROW_WORDS apart, the way a GEMV program walks a weight
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    r = tl.arange(0, RG)[:, None]
    c = tl.arange(0, BK)[None, :]
    col = sp * (BK * ROUNDS) + c
    ptrs = src + (pid * RG + r).to(tl.int64) * ROW_WORDS + col
    acc = tl.zeros([RG, BK], tl.int32)
    for i in tl.static_range(ROUNDS):
        acc ^= tl.load(ptrs + i * BK, mask=col + i * BK < ROW_WORDS, other=0, cache_modifier=".cg")
    pdl_enter(PDL)
    tl.store(out + pid * tl.num_programs(1) + sp, tl.xor_sum(tl.xor_sum(acc, 1), 0))


@gluon.jit
def _read_walk_kernel(src, out, ROW_WORDS, NB, DIAG: gl.constexpr, W: gl.constexpr, NBS: gl.constexpr,
                      PDL: gl.constexpr):
    # src: il4 words (rows = row groups of 4 rows, ROW_WORDS = 4 x K / 8 words; a 128-k block of a row group is
    # 64 words), read the way a tensor-core GEMV's warps read it: a step is 4 loads s of [W warps, 8 lanes g, 4
    # lanes c, 4 words] (word 16 s + 4 c + t of a block: each lane one 16-byte load, 64 contiguous bytes a block a
    # load). DIAG 0 (gemv_mma.py): g is the program's 8 row groups, warp w takes blocks kb0 + W i + w; DIAG 1:
    # warp w takes row group W pid + w, lane g block kb0 + 8 i + g (2 KB contiguous a warp a step); DIAG 2: lanes
    # g = 2 r + h pair up on row group 4 pid + r (4 a program), lane (h, c) word 4 h + c + 8 s of the warp's two
    # blocks kb0 + 2 (W i + w) + (0, 1): each load 128 contiguous bytes (a whole line) a row group. Program (pid,
    # sp) walks blocks sp NBS .. (sp + 1) NBS - 1; every load is issued before the first xor.
    L: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 1, 4], threads_per_warp=[1, 8, 4, 1],
                                       warps_per_cta=[W, 1, 1, 1], order=[3, 2, 1, 0])
    pid = gl.program_id(0)
    sp = gl.program_id(1)
    a = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))[:, None, None, None]
    g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))[None, :, None, None]
    c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))[None, None, :, None]
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))[None, None, None, :]
    kb0 = sp * NBS
    if DIAG == 1:
        rg = pid * W + a
        inner = g
        BPS: gl.constexpr = 8
    elif DIAG == 2:
        rg = pid * 4 + g // 2
        inner = a * 2
        BPS: gl.constexpr = 2 * W
    else:
        rg = pid * 8 + g
        inner = a
        BPS: gl.constexpr = W
    acc = gl.zeros([W, 8, 4, 4], gl.int32, L)
    for i in gl.static_range((NBS + BPS - 1) // BPS):
        blk = kb0 + i * BPS + inner
        if DIAG == 2:
            base = rg.to(gl.int64) * ROW_WORDS + blk * 64 + ((g % 2) * 4 + c) * 4 + t
            for s in gl.static_range(4):
                bs = blk + s // 2  # words 8 s .. 8 s + 7 of the two blocks: s = 2, 3 in the second
                acc ^= gl.load(src + base + s * 32, mask=(bs < NB) & (bs < kb0 + NBS), other=0,
                               cache_modifier=".cg")
        else:
            m = (blk < NB) & (blk < kb0 + NBS)
            base = rg.to(gl.int64) * ROW_WORDS + blk * 64 + c * 4 + t
            for s in gl.static_range(4):
                acc ^= gl.load(src + base + s * 16, mask=m, other=0, cache_modifier=".cg")
    _gdc(True)  # the loads above depend on nothing; the write waits for the previous kernel (pdl.py)
    _gdc(False)
    tot = gl.sum(gl.sum(gl.sum(gl.sum(acc, axis=3), axis=2), axis=1), axis=0)
    gl.store(out + pid * gl.num_programs(1) + sp, tot)


NAMES = {0: "mma  ", 1: "diag ", 2: "pairs"}


def walk_floor(rows: int, row_words: int, configs, verbose=True) -> list:
    """Each (DIAG, W, NBS) walk (_read_walk_kernel) of a (rows, row_words) il4 matrix, PDL launches, fastest
    first: [(µs, config)]."""
    nbytes = rows * row_words * 4
    nb = row_words // 64
    copies = max(2, min(256, math.ceil(ROTATE_BYTES / nbytes)))
    srcs = [torch.randint(-2**31, 2**31 - 1, (rows, row_words), dtype=torch.int32, device="cuda")
            for _ in range(copies)]
    res = []
    for diag, w, nbs in configs:
        per = {0: 8, 1: w, 2: 4}[diag]  # row groups a program
        grid = (rows // per, triton.cdiv(nb, nbs))
        if rows % per:
            continue
        out = torch.empty(grid[0] * grid[1], dtype=torch.int32, device="cuda")
        fns = [(lambda s=s: _read_walk_kernel[grid](s, out, row_words, nb, DIAG=diag, W=w, NBS=nbs, PDL=1,
                                                    num_warps=w, launch_pdl=True)) for s in srcs]
        t = _ms_graph(fns) * 1e3
        res.append((t, (diag, w, nbs)))
        if verbose:
            print(f"    walk {rows}x{row_words} {NAMES[diag]} {w} warps {nbs} blocks a program "
                  f"({grid[0] * grid[1]} programs): {t:.2f} us ({nbytes / t / 1e3:.0f} GB/s)", flush=True)
    del srcs
    return sorted(res)


def tile_floor(rows: int, row_words: int, configs, verbose=True) -> list:
    """Each (RG, BK, ROUNDS, warps) read of a (rows, row_words) int32 matrix (PDL launches), fastest first:
    [(µs, config)]. What a GEMV program's walk over its rows costs with nothing else in the kernel."""
    nbytes = rows * row_words * 4
    copies = max(2, min(256, math.ceil(ROTATE_BYTES / nbytes)))
    srcs = [torch.randint(-2**31, 2**31 - 1, (rows, row_words), dtype=torch.int32, device="cuda")
            for _ in range(copies)]
    kw = {"PDL": 1, "launch_pdl": True} if pdl_enabled(torch.cuda.current_device()) else {"PDL": 0}
    res = []
    for rg, bk, rounds, nw in configs:
        if rows % rg:
            continue
        grid = (rows // rg, triton.cdiv(row_words, bk * rounds))
        out = torch.empty(grid[0] * grid[1], dtype=torch.int32, device="cuda")
        fns = [(lambda s=s: _read_tile_kernel[grid](s, out, row_words, RG=rg, BK=bk, ROUNDS=rounds, num_warps=nw,
                                                    **kw)) for s in srcs]
        t = _ms_graph(fns) * 1e3
        res.append((t, (rg, bk, rounds, nw)))
        if verbose:
            print(f"    tile {rows}x{row_words} RG {rg} BK {bk} x{rounds} {nw} warps: {t:.2f} us "
                  f"({nbytes / t / 1e3:.0f} GB/s)", flush=True)
    del srcs
    return sorted(res)


def _ms_graph(fns, replays=20):
    from kernels import ms_graph  # the same timing loop as the GEMVs
    return ms_graph(fns, replays)


def floor_us(nbytes: int, configs=CONFIGS, verbose=False) -> dict:
    """Fastest read of nbytes over configs, plain and PDL launches: {'us', 'config', 'pdl', 'us_plain',
    'us_pdl'} (µs a call)."""
    n_words = -(-nbytes // 64) * 16  # whole 64-byte units so the masked loads keep 16-byte vectors
    copies = max(2, min(256, math.ceil(ROTATE_BYTES / max(nbytes, 1))))
    srcs = [torch.randint(-2**31, 2**31 - 1, (n_words,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    pdl_ok = pdl_enabled(torch.cuda.current_device())
    best = {"plain": (float("inf"), None), "pdl": (float("inf"), None)}
    for words, rounds, nw in configs:
        block = words * 32 * nw * rounds
        grid = (triton.cdiv(n_words, block),)
        out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
        for mode in ("plain", "pdl") if pdl_ok else ("plain",):
            kw = {"PDL": 1, "launch_pdl": True} if mode == "pdl" else {"PDL": 0}
            fns = [(lambda s=s: _read_kernel[grid](s, out, n_words, WORDS=words, ROUNDS=rounds, num_warps_c=nw,
                                                   num_warps=nw, **kw)) for s in srcs]
            t = _ms_graph(fns) * 1e3
            if verbose:
                print(f"    {nbytes / 1e6:8.2f} MB {words}w x{rounds} {nw}warps {mode}: {t:.2f} us", flush=True)
            if t < best[mode][0]:
                best[mode] = (t, (words, rounds, nw))
    del srcs
    mode = min(best, key=lambda m: best[m][0])
    return dict(us=best[mode][0], config=best[mode][1], pdl=mode == "pdl", us_plain=best["plain"][0],
                us_pdl=best["pdl"][0])


def _matrices(specs: str):
    """'rows x row_words;...' -> (rows, row_words, the read floor of its bytes) each, the floor printed."""
    for spec in specs.split(";"):
        rows, row_words = (int(v) for v in spec.split("x"))
        nbytes = rows * row_words * 4
        f = floor_us(nbytes)
        print(f"{rows} x {row_words} words ({nbytes / 1e6:.1f} MB): read floor {f['us']:.2f} us {f['config']}",
              flush=True)
        yield rows, row_words, f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", default="2.2,4.4,6.4,8.3,34,68,272", help="sizes in MB (1e6 bytes)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--tile-configs", default="", help="'RG,BK,ROUNDS,warps;...' in place of TILE_CONFIGS")
    ap.add_argument("--tiles", default="", help="'rows x row_words;...' (int32 words): time the tile walks of "
                    "TILE_CONFIGS over each such matrix instead (il4 7B down: 896x9472, gate+up 9472x1792)")
    ap.add_argument("--walks", default="", help="'rows x row_words;...': time the tensor-core GEMV's walks "
                    "(--walk-configs 'DIAG,W,NBS;...') over each such il4 matrix")
    ap.add_argument("--walk-configs", default="0,4,19;0,8,37;0,4,7;0,4,4;1,4,8;1,4,32;2,4,16;2,4,28;2,8,16;2,8,32",
                    help="DIAG (0 gemv_mma's walk, 1 one row group a warp, 2 row-group pairs), warps, blocks a program")
    args = ap.parse_args()
    from qrun.runtime.bench import copy_bandwidth
    copy_bw = copy_bandwidth(torch.device("cuda"), 2 << 30)
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw:.0f} GB/s (read+write, 2 GB, eager)")
    if args.walks:
        cfgs = [tuple(int(v) for v in c.split(",")) for c in args.walk_configs.split(";")]
        for rows, row_words, f in _matrices(args.walks):
            for t, (diag, w, nbs) in walk_floor(rows, row_words, cfgs, verbose=args.verbose):
                print(f"  {NAMES[diag]} {w} warps {nbs:3d} blocks a program: {t:.2f} us "
                      f"({100 * f['us'] / t:.0f}% of floor)", flush=True)
        return
    if args.tiles:
        cfgs = ([tuple(int(v) for v in c.split(",")) for c in args.tile_configs.split(";")]
                if args.tile_configs else TILE_CONFIGS)
        for rows, row_words, f in _matrices(args.tiles):
            res = tile_floor(rows, row_words, cfgs, verbose=args.verbose)
            for rg in sorted({c[0] for c in cfgs}):
                best = [r for r in res if r[1][0] == rg][:4]
                print(f"  RG {rg:2d}: " + "  ".join(f"{t:.2f} us BK {c[1]} x{c[2]} {c[3]}w "
                                                   f"({100 * f['us'] / t:.0f}% of floor)" for t, c in best), flush=True)
        return
    for mb in (float(v) for v in args.mb.split(",")):
        nbytes = int(mb * 1e6)
        f = floor_us(nbytes, verbose=args.verbose)
        gbs = nbytes / f["us"] / 1e3
        print(f"{mb:8.2f} MB  floor {f['us']:8.2f} us  {gbs:6.0f} GB/s  {100 * gbs / copy_bw:5.1f}% of copy  "
              f"(plain {f['us_plain']:.2f}, PDL {f['us_pdl']:.2f}; {f['config']})", flush=True)


if __name__ == "__main__":
    main()
