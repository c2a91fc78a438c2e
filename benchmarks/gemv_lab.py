"""Where does the M = 1 int4 GEMV lose bandwidth? A lab on the 7B shapes (GPU only).

    PYTHONUNBUFFERED=1 python3 benchmarks/gemv_lab.py [--shapes gate_up,down,qkv]

Times, in one run and each as a CUDA graph rotating through > 200 MB of weight copies (so L2 cannot serve
them):
  * copy: a 2 GiB device-to-device copy (bytes read + written), the ceiling the issue names;
  * stream: a Triton kernel that only reads the packed weight front to back (16 KB per program) - the read
    ceiling for a kernel that touches the same bytes;
  * lab kernels, the GEMV's own loop with two things switched:
      layout  row = the canonical (N, K/8) int32 words (what the production kernel reads),
              tile = repacked so the (BLOCK_N rows, G blocks) piece of each K step is one contiguous run;
      mode    read = load the words and scales and add them up (no x, no dequant): the access pattern alone,
              full = the production dequant + dot (gemv4._step);
    (--patterns; the first run of round 4 showed the access pattern is not the limit: docs/PERF.md);
  * prod: the production gemv_int4_kernel at the given configs;
  * il: rows interleaved by 4 (il_kernel), the candidate layout.
Prints one table: us per call, GB/s over packed weights + scales, % of copy.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import copy_bandwidth, ms_graph as graph_ms  # noqa: E402  (benchmarks/kernels.py)
from qrun.kernels.gemv4 import _nibbles, _split8, _step, gemv_int4_kernel  # noqa: E402
from qrun.kernels.gemv_il import _dot_words  # noqa: E402

SHAPES = {"gate_up": (3584, 37888), "down": (18944, 3584), "qkv": (3584, 4608), "o": (3584, 3584),
          "lm_head": (3584, 152064), "gate_up_05": (896, 9728), "down_05": (4864, 896)}
B = 128
ROTATE = 200e6


@triton.jit
def stream_kernel(w_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    off = pid * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + off, mask=off < n_words, other=0)
    tl.store(out_ptr + pid, tl.sum(w, axis=0))


@triton.jit
def _lab_load(w_ptr, s_ptr, rb, st, steps, N, NB, stride_wn, stride_sn,
              B: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, TILED: tl.constexpr):
    WPB: tl.constexpr = B // 8
    T: tl.constexpr = WPB // 4
    r = tl.arange(0, BLOCK_N)
    rows = tl.minimum(rb * BLOCK_N + r, N - 1)
    gi = st * G + tl.arange(0, G)
    gm = gi < NB
    col = (tl.arange(0, G)[:, None, None] * WPB + tl.arange(0, T)[None, :, None] * 4
           + tl.arange(0, 4)[None, None, :])                                   # (G, T, 4)
    if TILED:  # tile (rb, st) starts at (rb * steps + st) * BLOCK_N * G * WPB; its row r at r * G * WPB
        base = ((rb * steps + st) * BLOCK_N + r) * (G * WPB)
        w = tl.load(w_ptr + base[:, None, None, None] + col[None], mask=gm[None, :, None, None], other=0)
    else:
        base = rows * stride_wn + st * G * WPB
        w = tl.load(w_ptr + base[:, None, None, None] + col[None], mask=gm[None, :, None, None], other=0)
    s = tl.load(s_ptr + rows[:, None] * stride_sn + gi[None, :], mask=gm[None, :], other=0.0)
    return w, s.to(tl.float32), rows


@triton.jit
def lab_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, NB, stride_wn, stride_sn,
               B: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, TILED: tl.constexpr,
               FULL: tl.constexpr, ASM: tl.constexpr = True):
    pid = tl.program_id(0)
    steps = tl.cdiv(NB, G)
    w, s, rows = _lab_load(w_ptr, s_ptr, pid, 0, steps, N, NB, stride_wn, stride_sn, B, G, BLOCK_N, TILED)
    acc = tl.zeros((BLOCK_N, G, B // 32), tl.float32)
    for st in range(0, steps):
        w_n, s_n, _r = _lab_load(w_ptr, s_ptr, pid, st + 1, steps, N, NB, stride_wn, stride_sn, B, G, BLOCK_N,
                                 TILED)
        if FULL:
            part, _sq = _step(x_ptr, s_ptr, s_ptr, w, s, rows, st * G, K, NB, 0, "int4_sym", B, G, ASM, False)
            acc += part
        else:
            acc += tl.sum(w, axis=3).to(tl.float32) + s[:, :, None]
        w, s = w_n, s_n
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    rr = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rr, out.to(y_ptr.dtype.element_ty), mask=rr < N)


@triton.jit
def il_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, NB,
              B: tl.constexpr, G: tl.constexpr, R4: tl.constexpr, ASM: tl.constexpr = True):
    """Rows interleaved by 4: w (N/4, KW, 4) int32 with w[r, kw, j] = word kw of row 4 r + j, scales likewise
    (N/4, NB, 4). A thread's 16-byte load is 4 rows x 8 k, so its x is one 16-byte load of 8 k and the words
    and x share one layout. Program: R4 groups of 4 rows; step: G blocks."""
    WPB: tl.constexpr = B // 8
    KW = NB * WPB
    pid = tl.program_id(0)
    r4 = tl.minimum(pid * R4 + tl.arange(0, R4), N // 4 - 1)
    g = tl.arange(0, G)
    p = tl.arange(0, WPB)
    j = tl.arange(0, 4)
    woff = (r4[:, None, None, None] * (KW * 4) + (g[None, :, None, None] * WPB + p[None, None, :, None]) * 4
            + j[None, None, None, :])                                          # (R4, G, WPB, 4)
    soff = r4[:, None, None, None] * (NB * 4) + g[None, :, None, None] * 4 + j[None, None, None, :] \
        + 0 * p[None, None, :, None]
    xoff = (g[:, None, None] * WPB + p[None, :, None]) * 8 + tl.arange(0, 8)[None, None, :]   # (G, WPB, 8)
    steps = tl.cdiv(NB, G)
    gm = (g < NB)[None, :, None, None]
    w = tl.load(w_ptr + woff, mask=gm, other=0)
    s = tl.load(s_ptr + soff, mask=gm, other=0.0).to(tl.float32)
    acc = tl.zeros((R4, G, WPB, 4), tl.float32)
    for st in range(0, steps):
        g0 = st * G
        gm = ((g0 + G + g) < NB)[None, :, None, None]
        w_n = tl.load(w_ptr + woff + (g0 + G) * (WPB * 4), mask=gm, other=0)
        s_n = tl.load(s_ptr + soff + (g0 + G) * 4, mask=gm, other=0.0).to(tl.float32)
        kk = g0 * B + xoff
        xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)          # (G, WPB, 8)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xv)                              # (G, WPB) each
        cx = 136.0 * ((x0 + x2 + x4 + x6) + (x1 + x3 + x5 + x7))
        if ASM:
            d = _dot_words(w, x0[None, :, :, None], x1[None, :, :, None], x2[None, :, :, None],
                           x3[None, :, :, None], x4[None, :, :, None], x5[None, :, :, None],
                           x6[None, :, :, None], x7[None, :, :, None], -cx[None, :, :, None], True)
        else:
            f0, f1, f2, f3, f4, f5, f6, f7 = _nibbles(w, True, False)
            d = (f0 * x0[None, :, :, None] + f1 * x1[None, :, :, None] + f2 * x2[None, :, :, None]
                 + f3 * x3[None, :, :, None] + f4 * x4[None, :, :, None] + f5 * x5[None, :, :, None]
                 + f6 * x6[None, :, :, None] + f7 * x7[None, :, :, None] - cx[None, :, :, None])
        acc += d * s
        w, s = w_n, s_n
    out = tl.sum(tl.sum(acc, axis=2), axis=1)                                     # (R4, 4)
    rows = (pid * R4 + tl.arange(0, R4))[:, None] * 4 + j[None, :]
    tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=rows < N)


def interleave(t):
    """(N, C) -> (N/4, C, 4) flattened: row 4 r + j's element c at [r, c, j]."""
    n, c = t.shape
    return t.view(n // 4, 4, c).permute(0, 2, 1).contiguous().view(-1)


def tile(w32, block_n, g):
    """(N, K/8) words -> [(rb, step, row, G*16 words)] flattened; N and the blocks padded with zeros."""
    n, kw = w32.shape
    wpb = B // 8
    nb = kw // wpb
    steps = -(-nb // g)
    n_rb = -(-n // block_n)
    p = torch.zeros((n_rb * block_n, steps * g * wpb), dtype=w32.dtype, device=w32.device)
    p[:n, :kw] = w32
    return p.view(n_rb, block_n, steps, g * wpb).permute(0, 2, 1, 3).contiguous().view(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="gate_up,down,qkv,o,gate_up_05,down_05")
    ap.add_argument("--configs", default="4x8x1,16x8x4", help="production / pattern-study configs")
    ap.add_argument("--il", default="1x2x1,2x2x1,4x2x1,2x4x2,4x4x2,8x2x1,2x8x4",
                    help="interleaved kernel configs R4 x G x warps")
    ap.add_argument("--patterns", action="store_true", help="also the row/tile read/full study")
    a = ap.parse_args()
    copy = copy_bandwidth()
    print(f"copy {copy / 1e9:.0f} GB/s", flush=True)
    rows = []
    for name in a.shapes.split(","):
        k, n = SHAPES[name]
        nb = k // B
        nbytes = n * k // 2 + n * nb * 2
        nc = max(2, int(ROTATE // nbytes) + 1)
        ws = [torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda") for _ in range(nc)]
        ss = [(torch.rand(n, nb, device="cuda") * 0.01).half() for _ in range(nc)]
        x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(n, device="cuda", dtype=torch.bfloat16)

        def record(label, ms):
            bw = nbytes / (ms * 1e-3)
            rows.append((name, label, ms * 1e3, bw / 1e9, 100 * bw / copy))
            print(f"  {name:8s} {label:22s} {ms * 1e3:8.2f} us {bw / 1e9:7.0f} GB/s {100 * bw / copy:5.1f}%",
                  flush=True)

        for blk in (4096, 8192):
            part = torch.empty(triton.cdiv(n * k // 8, blk), device="cuda", dtype=torch.int32)
            record(f"stream {blk}w", graph_ms([lambda w=w: stream_kernel[(part.numel(),)](w, part, w.numel(),
                                                                                     BLOCK=blk, num_warps=4)
                                               for w in ws]))
        q = ((ws[0].view(torch.uint8).view(n, k // 2)[..., None] >> torch.tensor(
            [0, 4], device="cuda", dtype=torch.uint8)) & 15 ^ 8).view(n, k).float() - 8  # two's complement
        ref = (q.view(n, nb, B) * ss[0].float()[..., None]).view(n, k) @ x.float()
        del q

        def checked(label):
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (name, label, err)

        if a.patterns:  # the access-pattern study (round 4, first run)
            for cfg in a.configs.split(","):
                bn, g, warps = map(int, cfg.split("x"))
                g = min(g, triton.next_power_of_2(nb))
                tiles = [tile(w, bn, g) for w in ws]
                grid = (triton.cdiv(n, bn),)
                for layout, wl in (("row", ws), ("tile", tiles)):
                    for full in (False, True):
                        def f(w, s):
                            lab_kernel[grid](x, w, s, y, n, k, nb, k // 8, nb, B=B, G=g, BLOCK_N=bn,
                                             TILED=layout == "tile", FULL=full, num_warps=warps, num_stages=1)
                        record(f"{layout} {'full' if full else 'read'} {bn}x{g}x{warps}",
                               graph_ms([lambda w=w, s=s: f(w, s) for w, s in zip(wl, ss)]))
                del tiles
        for cfg in a.configs.split(","):
            bn, g, warps = map(int, cfg.split("x"))
            g = min(g, triton.next_power_of_2(nb))
            grid = (triton.cdiv(n, bn),)

            def prod(w, s):
                gemv_int4_kernel[grid](x, w, s, s, s, s, s, y, n, k, nb, k // 8, nb, nb, 0.0, ENC="int4_sym",
                                       B=B, HAS_BIAS=False, SILU=False, NORM=False, HAS_RES=False, BLOCK_N=bn,
                                       G=g, PERSIST=False, PDL=False, num_warps=warps, num_stages=1)
            y.fill_(float("nan"))
            prod(ws[0], ss[0])
            checked(f"prod {cfg}")
            record(f"prod {bn}x{g}x{warps}", graph_ms([lambda w=w, s=s: prod(w, s) for w, s in zip(ws, ss)]))
        wi = [interleave(w) for w in ws]
        si = [interleave(s) for s in ss]
        for cfg in a.il.split(","):
            r4, g, warps = map(int, cfg.split("x"))

            def il(w, s):
                il_kernel[(triton.cdiv(n // 4, r4),)](x, w, s, y, n, k, nb, B=B, G=g, R4=r4, num_warps=warps,
                                                       num_stages=1)
            y.fill_(float("nan"))
            il(wi[0], si[0])
            checked(f"il {cfg}")
            record(f"il {r4}x{g}x{warps}", graph_ms([lambda w=w, s=s: il(w, s) for w, s in zip(wi, si)]))
        del wi, si
        del ws, ss
        torch.cuda.empty_cache()
    print(f"\ncopy {copy / 1e9:.0f} GB/s\n{'shape':8s} {'variant':22s} {'us':>8s} {'GB/s':>7s} {'%copy':>6s}")
    for r in rows:
        print(f"{r[0]:8s} {r[1]:22s} {r[2]:8.2f} {r[3]:7.0f} {r[4]:6.1f}")


if __name__ == "__main__":
    main()
