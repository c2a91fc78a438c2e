"""Every GEMM config the launcher offers at one M, its error against a float64 reference over several runs:
which configs are right on the GPU, one line each. A diagnosis tool for races (device tool, carry [".whl"]);
tests/test_kernels_gpu.py::test_prefill_gemm_every_config is the test.

    python3 benchmarks/gemm_check.py [--m 1024] [--k 3584] [--n 3584] [--silu] [--layout il4] [--enc int4_asym]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--k", type=int, default=3584)
    ap.add_argument("--n", type=int, default=3584, help="output features (per half with --silu)")
    ap.add_argument("--silu", action="store_true")
    ap.add_argument("--layout", default="il4")
    ap.add_argument("--enc", default="int4_asym")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = 2 * a.n if a.silu else a.n
    qt = quantize(torch.randn(rows, a.k) * 0.05, a.enc, 128)
    parts = tuple(qt.parts.get(p) for p in ("qweight", "scales", "zeros"))
    w = dequantize_parts(a.enc, parts_of(*parts), (rows, a.k), 128, dtype=torch.bfloat16).double().cuda()
    lp = to_layout(a.layout, *(p.cuda() if p is not None else None for p in parts))
    x = torch.randn(a.m, a.k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ w.T
    if a.silu:
        g, u = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(g) * u
    orig = ops._gemm_candidates
    for cfg in orig(a.m, 128, a.layout):
        ops._tuned.clear()
        ops._gemm_candidates = lambda *_, c=cfg, **__: [c]
        errs = []
        for _ in range(a.repeats):
            if a.silu:
                y = quant_linear_silu_mul(x, *lp, encoding=a.enc, block_size=128, in_features=a.k, layout=a.layout)
            else:
                y = quant_linear(x, *lp, None, encoding=a.enc, block_size=128, in_features=a.k, layout=a.layout)
            torch.cuda.synchronize()
            errs.append(((y.double() - ref).norm() / ref.norm()).item())
        print(f"{cfg}  split {ops.LAST.get('gemm_split')}  rel err " + " ".join(f"{e:.2e}" for e in errs),
              flush=True)
    ops._gemm_candidates = orig


if __name__ == "__main__":
    main()
