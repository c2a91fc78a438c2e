"""The prefill GEMM's main loop in SASS, compiled ahead of time for sm_90 on a machine without a GPU (triton's own
ptxas and cuobjdump, as compile_report.py): registers, instructions in the K loop, their histogram, and the
shared-memory instructions in it. No device time.

    PYTHONPATH=/tmp/t36 python3 benchmarks/gemm_sass.py [--tile 128,256,64] [--no-swap] [--layout il4]
        [--enc int4_asym] [--even 0,1]

(/tmp/t36: the device's triton 3.6, installed as compile_check.py says.) docs/PERF.md attempt 46's counts come
from the default tile with --even 0,1, and from --tile 128,128,64 and --no-swap.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compile_check as cc  # noqa: E402
import compile_report as cr  # noqa: E402
from qrun.kernels.gemm import gemm_kernel  # noqa: E402
from qrun.kernels.layout import LAYOUTS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tile", default="128,256,64", help="BLOCK_N,BLOCK_M,BLOCK_K")
    ap.add_argument("--no-swap", action="store_true")
    ap.add_argument("--layout", default="il4", choices=LAYOUTS)
    ap.add_argument("--enc", default="int4_asym")
    ap.add_argument("--even", default="0,1", help="EVEN values to compile")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    a = ap.parse_args()
    bn, bm, bk = (int(v) for v in a.tile.split(","))
    base = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "code_ptr", "bias_ptr", "y_ptr")
    for even in (v == "1" for v in a.even.split(",")):
        const = dict(ENC=a.enc, B=128, HAS_BIAS=False, SILU=False, SPLIT_K=1, LAY=LAYOUTS.index(a.layout),
                     INTERPRET=False, BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SWAP=not a.no_swap, EVEN=even)
        k = cc.compile_one(gemm_kernel, cc.ptrs(base, "bf16", w_ptr="*u8", s_ptr="*fp16", z_ptr="*u8",
                                                code_ptr="*fp32"), const, a.warps, a.stages)
        regs, _, _, sass = cr.report(k)
        body = cc.k_loop(sass)
        ops = [re.sub(r"^@!?U?P\w+\s+", "", b).split()[0] for b in body]
        hist = collections.Counter(o.split(".")[0] for o in ops)
        smem = collections.Counter(o for o in ops if o.startswith(("STS", "LDS", "BAR")))
        print(f"{a.layout} {a.enc} tile {bn}x{bm}x{bk} {'SWAP' if not a.no_swap else 'no SWAP'} EVEN={int(even)}: "
              f"{regs} registers, K loop {len(body)} instructions")
        print("  " + ", ".join(f"{o} {n}" for o, n in hist.most_common(14)))
        print("  shared memory in the loop: " + ", ".join(f"{o} {n}" for o, n in sorted(smem.items())))


if __name__ == "__main__":
    main()
