"""Where the tensor-core GEMV for M = 1 (gemv_mma.gemv_il4_mma_kernel) spends its time: each of its configs timed
whole, without its loop's arithmetic (KNOCK 1: the loads, x staging and epilogue alone) and without its loop's
loads (KNOCK 2: the arithmetic alone), and as 1 without loading x (KNOCK 3), beside the read floor of the same bytes (read_floor.py) and the tuner's
own pick. Timed as kernels.py times the GEMVs (a CUDA graph over rotated copies). Results are wrong for KNOCK != 0;
only the times mean anything.

    python3 benchmarks/mma_knockout.py [--shapes "7B down,7B gate+up,7B qkv,7B o"]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels as kb  # noqa: E402
import qrun.kernels.ops as ops  # noqa: E402
from read_floor import floor_us  # noqa: E402

KNOCKS = {0: "whole", 1: "loads only", 2: "arithmetic only", 3: "loads only, no x"}


def time_config(k, n, silu, cfg):
    """µs a call of ours with the launcher held to cfg (None: the tuner's pick), graph over rotated copies."""
    orig = ops._il4_candidates
    if cfg is not None:
        ops._il4_candidates = lambda *a, **kw: [cfg]
    ops._tuned.clear()
    try:
        fns, nbytes = kb.make_ours(k, n, silu, 1, kb.copies_for(n * k // 2))
        t = kb.ms_graph(fns) * 1e3
        picked = dict(ops.LAST["gemv_cfg"])
    finally:
        ops._il4_candidates = orig
        ops._tuned.clear()
    del fns
    return t, nbytes, picked


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="7B down,7B gate+up,7B qkv,7B o")
    ap.add_argument("--knocks", default="0,1,2,3")
    ap.add_argument("--table", default="", help="configs 'warps,SPLIT,AHEAD;...' in place of ops.MMA_TABLE")
    a = ap.parse_args()
    if a.table:
        ops.MMA_TABLE = tuple(tuple(int(v) for v in c.split(",")) for c in a.table.split(";"))
    for kn in set(KNOCKS) - {int(v) for v in a.knocks.split(",")}:
        del KNOCKS[kn]
    torch.manual_seed(0)
    from qrun.runtime.bench import copy_bandwidth
    copy = copy_bandwidth(torch.device("cuda"), 2 << 30)
    print(f"{torch.cuda.get_device_name()}, copy {copy:.0f} GB/s; µs a call inside a CUDA graph over rotated copies")
    shapes = {s[0]: s[1:] for s in kb.SHAPES}
    nb_of = {}
    for name in a.shapes.split(","):
        k, n, silu = shapes[name.strip()]
        nb_of[name] = -(-k // kb.BLOCK)
        rows = []
        t, nbytes, picked = time_config(k, n, silu, None)
        rows.append(("tuner's pick " + "/".join(f"{key}={v}" for key, v in picked.items()), t))
        f = floor_us(nbytes)
        rows.append((f"read floor {f['config']} {'PDL' if f['pdl'] else 'plain'}", f["us"]))
        for cfg in ops._mma_candidates(nb_of[name]):
            for knock, what in KNOCKS.items():
                ops.MMA_KNOCK = knock
                try:
                    t, _, _ = time_config(k, n, silu, cfg)
                finally:
                    ops.MMA_KNOCK = 0
                rows.append((f"mma w{cfg['num_warps']} split {cfg['SPLIT']} ahead {cfg['AHEAD']}: {what}", t))
        print(f"\n{name}: K {k} -> N {n}, {nbytes / 1e6:.1f} MB")
        for what, t in rows:
            gbs = nbytes / t / 1e3
            print(f"  {what:58s} {t:8.2f} µs {gbs:6.0f} GB/s {100 * gbs / copy:5.1f}% of copy", flush=True)


if __name__ == "__main__":
    main()
