"""Where the warp-specialized prefill GEMM (gemm_wg.gemm_il4_ws_kernel) spends its time: the kernel timed with one
stage left out (its KNOCK argument), beside the kernel itself, the non-specialized Gluon GEMM and cuBLAS bf16, on
the 7B shapes at M = 1024. Results are wrong for KNOCK != 0; only the times mean anything.

    python3 benchmarks/ws_knockout.py [--m 1024] [--shapes "7B down,7B gate+up"]

KNOCK: 1 no dequantization (the wgmmas read an unwritten W ring: the MMA and load pipeline alone), 2 no wgmma
(the dequantization and loads alone), 3 no proxy fence after the W stores, 4 no scale loads in the loop.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qrun.kernels.gemm_wg import descriptors, gemm_il4_wg_kernel, gemm_il4_ws_kernel  # noqa: E402

SHAPES = {"7B qkv": (3584, 4608, False), "7B o": (3584, 3584, False), "7B gate+up": (3584, 2 * 18944, True),
          "7B down": (18944, 3584, False), "0.5B gate+up": (896, 2 * 4864, True)}
KNOCKS = {0: "kernel", 1: "no dequant", 2: "no wgmma", 3: "no fence", 4: "no scale loads"}


def bench(fn) -> float:
    """Median µs of fn inside a CUDA graph (20 calls a replay)."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=200) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--shapes", default="7B down,7B gate+up,7B o")
    ap.add_argument("--configs", default="128,256,4,6,2,1;128,256,4,6,2,0",
                    help="BLOCK_N,BLOCK_M,x buffers,packed W buffers,W buffers,stream-K over one program a SM (1) "
                         "or a program a tile (0); several separated by ';'")
    ap.add_argument("--no-knock", action="store_true", help="time the kernel only")
    a = ap.parse_args()
    m = a.m
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, M = {m}; µs a call inside a CUDA graph; TFLOP/s counts 2 M N K")
    for name in a.shapes.split(","):
        k, n, silu = SHAPES[name.strip()]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        s = (torch.rand(n, k // 128, device="cuda") * 1e-2 + 1e-3).half()
        n_out = n // 2 if silu else n
        y = torch.empty(m, n_out, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        flop = 2 * m * n * k
        rows = []
        t = bench(lambda: F.linear(x, w))
        rows.append(("cuBLAS bf16", t))
        args = (s, s, y, y, m, n_out, s.stride(0), s.stride(0), y.stride(0))
        common = dict(B=128, ASYM=False, HAS_BIAS=False, SILU=silu, EVEN=True)
        xd, wd = descriptors(x, q, 128, 256, silu)
        grid = (-(-n_out // (64 if silu else 128)), -(-m // 256))
        t = bench(lambda: gemm_il4_wg_kernel[grid](xd, wd, *args, BLOCK_N=128, BLOCK_M=256, STAGES=4, num_warps=8,
                                                   **common))
        rows.append(("Gluon, not specialized 128x256", t))
        if a.no_knock:
            KNOCKS.clear()
            KNOCKS[0] = "kernel"
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for cfg in a.configs.split(";"):
            bn, bm, st, qs, wst, sk = (int(v) for v in cfg.split(","))
            xd, wd = descriptors(x, q, bn, bm, silu)
            mt = -(-m // bm)
            tiles = -(-n_out // (bn // 2 if silu else bn)) * mt
            progs = sms if sk else tiles
            part = torch.zeros(progs * bn * bm, device="cuda")
            cnt = torch.zeros(progs, device="cuda", dtype=torch.int32)
            for knock, what in KNOCKS.items():
                def fn(knock=knock):
                    gemm_il4_ws_kernel[(progs,)](xd, wd, s, s, y, y, part, cnt, *args[4:], tiles * (k // 64), mt, 0,
                                                 BLOCK_N=bn, BLOCK_M=bm, STAGES=st, QSTAGES=qs, WSTAGES=wst,
                                                 DQ_WARPS=4, DQ_REGS=168, num_warps=8, maxnreg=168, KNOCK=knock,
                                                 **common)
                rows.append((f"WS {bn}x{bm} x{st} q{qs} w{wst} {'SK' if sk else 'DP'}: {what}", bench(fn)))
        print(f"\n{name}: K {k} -> N {n}")
        for what, t in rows:
            print(f"  {what:40s} {t:9.1f} µs  {flop / t / 1e6:7.1f} TFLOP/s")


if __name__ == "__main__":
    main()
