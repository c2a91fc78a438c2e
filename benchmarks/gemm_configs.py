"""Correctness of every GEMM config (M > 1) for each weight layout at real shapes, each run several times, on
the GPU. A diagnosis tool, not a timing: a config that is right once and wrong the next run shows up as a
spread of errors in its row. Round 6 (docs/PERF.md) found the fused gate+up GEMM on tc16 wrong now and then;
QRUN_TC16_SILU_GEMM=1 puts that path back for this script to look at.

    python3 benchmarks/gemm_configs.py [--repeats 3] [--shapes "7B gate+up,7B down"] [--ms 3,64,200] [--every]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qrun.kernels import ops, quant_linear, quant_linear_silu_mul  # noqa: E402
from qrun.kernels.layout import to_layout  # noqa: E402
from qrun.kernels.reference import parts_of  # noqa: E402
from qrun.quant import dequantize_parts, quantize  # noqa: E402

SHAPES = {"7B qkv": (3584, 4608, False), "7B o": (3584, 3584, False), "7B gate+up": (3584, 2 * 18944, True),
          "7B down": (18944, 3584, False), "0.5B gate+up": (896, 2 * 4864, True), "0.5B down": (4864, 896, False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default="3,64,200")
    ap.add_argument("--layouts", default="il4,tc16")
    ap.add_argument("--every", action="store_true", help="also the configs ops.py leaves out as known wrong")
    a = ap.parse_args()
    torch.manual_seed(0)
    orig = ops._gemm_candidates
    bad = 0
    for name in a.shapes.split(","):
        k, n, silu = SHAPES[name.strip()]
        qt = quantize(torch.randn(n, k, device="cuda"), "int4_sym", 128)
        p = (qt.parts["qweight"], qt.parts["scales"], None)
        w = dequantize_parts("int4_sym", parts_of(*p), (n, k), 128, dtype=torch.bfloat16).double()
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ w.T
            if silu:
                g, u = ref.chunk(2, -1)
                ref = torch.nn.functional.silu(g) * u
            for lay in a.layouts.split(","):
                pl = to_layout(lay, *p)
                for c in orig(m, 128, lay, every=a.every):
                    ops._gemm_candidates = lambda *_, c=c, **kw: [c]
                    ops._tuned.clear()
                    errs = []
                    for _ in range(a.repeats):
                        if silu:
                            y = quant_linear_silu_mul(x, *pl, encoding="int4_sym", block_size=128, in_features=k,
                                                      layout=lay)
                        else:
                            y = quant_linear(x, *pl, None, encoding="int4_sym", block_size=128, in_features=k,
                                             layout=lay)
                        errs.append(((y.double() - ref).norm() / ref.norm()).item())
                    bad += max(errs) > 1e-2 or not all(e == e for e in errs)
                    cfg = ",".join(f"{v}" for v in c.values())
                    print(f"{name:13s} M={m:<4d} {lay:5s} {cfg:22s} " + " ".join(f"{e:.1e}" for e in errs),
                          flush=True)
    ops._gemm_candidates = orig
    print(f"{bad} config(s) with a relative error > 1e-2")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
