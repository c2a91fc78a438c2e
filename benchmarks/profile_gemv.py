"""One M = 1 call of our int4 GEMV (il4 layout, as the loader gives it) and of torch's int4 kernel on a 7B shape,
for Nsight Compute:

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        -k regex:gemv_il4 -s 3 -c 1 python3 benchmarks/profile_gemv.py [--shape gate_up|qkv|down|o] \
        [--config R4xGxDEEPxWARPS[xSPLITxPF]]

The launch config is pinned (default 1x8x1x4, SPLIT 1, PF 0), so no tuning launch is profiled. Four calls of
each. Round 9's question for ncu: why does the L2 prefetch (PF 1) leave 7B down and gate+up where they were
(docs/PERF.md attempt 43)? Compare e.g. `--shape down --config 1x2x0x1x4x0` and `1x2x0x1x4x1` on
dram__throughput, lts__t_sector_hit_rate and the warp stall reasons.

--m M > 1 runs the prefill GEMM instead (`-k regex:gemm_kernel`), pinned to --gemm-config
BLOCK_N x BLOCK_M x BLOCK_K x warps x stages x SWAP (default 128x256x64x8x3x1). Round 10's question
(docs/PERF.md attempt 52): do the dequantization and the wgmma of a K step overlap? Compare the tensor pipe's
utilization (ComputeWorkloadAnalysis) with the issue slots busy and the barrier stalls.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qrun.kernels.ops as ops  # noqa: E402
from qrun.kernels import quant_linear, quant_linear_silu_mul  # noqa: E402
from qrun.kernels.layout import interleave4  # noqa: E402
from qrun.quant import quantize  # noqa: E402

SHAPES = {"gate_up": (3584, 37888, True), "qkv": (3584, 4608, False), "down": (18944, 3584, False),
          "o": (3584, 3584, False)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gate_up", choices=sorted(SHAPES))
    ap.add_argument("--config", default="1x8x1x4", help="R4 x G x DEEP x warps [x SPLIT x PF] of the il4 GEMV")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--gemm-config", default="128x256x64x8x3x1")
    a = ap.parse_args()
    bn, bm, bk, gw, gs, swap = map(int, a.gemm_config.split("x"))
    ops._gemm_candidates = lambda *args, **kw: [dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SWAP=bool(swap),
                                                     num_warps=gw, num_stages=gs)]
    r4, g, deep, warps, split, pf = (list(map(int, a.config.split("x"))) + [1, 0])[:6]
    ops._il4_candidates = lambda nb, **kw: [dict(R4=r4, G=g, DEEP=bool(deep), SPLIT=split, PF=pf, num_warps=warps,
                                           num_stages=1)]
    k, n, silu = SHAPES[a.shape]
    qt = quantize(torch.randn(n, k, device="cuda"), "int4_sym", 128)
    qw, sc, _ = interleave4(qt.parts["qweight"], qt.parts["scales"], None)
    x = torch.randn(a.m, k, device="cuda", dtype=torch.bfloat16)
    packed = torch._convert_weight_to_int4pack(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8,
                                                             device="cuda"), 8)
    sz = (torch.rand(k // 128, n, 2, device="cuda") * 0.01).to(torch.bfloat16)
    for _ in range(4):
        if silu:
            quant_linear_silu_mul(x, qw, sc, None, encoding="int4_sym", block_size=128, in_features=k, layout="il4")
        else:
            quant_linear(x, qw, sc, None, None, encoding="int4_sym", block_size=128, in_features=k, layout="il4")
        torch._weight_int4pack_mm(x, packed, 128, sz)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
