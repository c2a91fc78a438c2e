"""Benchmark of the fused dequant-matmul kernels against cuBLAS bf16 and torch's int4 kernel (GPU only).

    PYTHONUNBUFFERED=1 python benchmarks/kernels.py [--json PATH] [--m 1,16,1024] [--quick]

1. correctness check of every shape at M = 1 and M = 64 (int4_sym, B = 128) against a float64 reference;
2. ceilings measured in the same run: device-to-device copy bandwidth (bytes read + written) and the time
   of an empty kernel launch, eager and inside a CUDA graph; at M = 1 the read floor of each shape's bytes
   (read_floor.py: the fastest a kernel that only reads them runs, timed the same way);
3. for each shape K -> N and M: median time per call of ours (int4_sym, B = 128, bf16; gate+up shapes use
   the fused silu-mul kernel), cuBLAS bf16 F.linear and torch._weight_int4pack_mm (g128). Each is timed
   as a CUDA graph of one call per input copy, rotating through enough copies of weights and x that L2
   (50 MB on an H100) cannot serve them, replayed many times; the median replay / copies is the time.
   At M = 1 also with one x for all copies (column xL2): in the decode step x is the previous kernel's output,
   in L2, and the launcher's chain tuner (ops._pick_chain) times its candidates that way.
Prints one table last and writes JSON ($OUT/kernels.json by default when $OUT is set).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qrun.kernels.ops as ops  # noqa: E402
import qrun.kernels.pdl as pdl  # noqa: E402
from qrun.kernels import quant_linear, quant_linear_silu_mul  # noqa: E402
from qrun.kernels.layout import to_layout  # noqa: E402
from qrun.kernels.reference import parts_of  # noqa: E402
from qrun.quant import dequantize_parts, quantize  # noqa: E402
from qrun.runtime.bench import copy_bandwidth  # noqa: E402
from read_floor import floor_us  # noqa: E402

SHAPES = [  # (model, K, N, gate+up?)
    ("0.5B qkv", 896, 1152, False), ("0.5B o", 896, 896, False), ("0.5B gate+up", 896, 9728, True),
    ("0.5B down", 4864, 896, False), ("0.5B lm_head", 896, 151936, False),
    ("7B qkv", 3584, 4608, False), ("7B o", 3584, 3584, False), ("7B gate+up", 3584, 37888, True),
    ("7B down", 18944, 3584, False), ("7B lm_head", 3584, 152064, False),
]
MS = [1, 2, 4, 8, 16, 64, 256, 1024]
ENC, BLOCK = "int4_sym", 128
SWEEP = ("0.5B qkv", "0.5B o", "0.5B gate+up", "0.5B down", "7B qkv", "7B o", "7B gate+up", "7B down", "7B lm_head")
ROTATE_BYTES = 200e6  # > 4x the H100's 50 MB L2
CHOICE = ["auto"]  # --layout
FLOOR = [True]  # --no-floor
LAYOUT = ["il4"]  # weight layout of ours for the current shape (set from --layout by layout_for)


def layout_for(choice, name, n):
    """--layout auto: what the loader gives int4 weights on CUDA by default, "il4" (QRUN_LAYOUT=tc16's choice
    is --layout tc16 for o and down)."""
    return "il4" if choice == "auto" else choice


@triton.jit
def _empty_kernel(p):
    pass


def ms_graph(fns, replays=20):
    """Median over replays of (graph replay time) / len(fns), one graph running every fn once, in ms."""
    for f in fns[:2]:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    del g
    return statistics.median(times)


def ms_eager(fn, n=200):
    """Median over 5 rounds of (n back-to-back eager calls) / n, in ms: includes the Python launch cost."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    return statistics.median(times)


def kernel_facts(k):
    """What the compiler made of the last launched kernel: registers, spills, wgmma, 16-byte loads."""
    asm = getattr(k, "asm", {}) or {}
    ttgir, ptx = asm.get("ttgir", ""), asm.get("ptx", "")
    return dict(regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                wgmma="warp_group_dot" in ttgir, mma="wgmma" in ptx or "mma.sync" in ptx,
                ld_v4=ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
                cp_async=ptx.count("cp.async"))


def copies_for(nbytes):
    return max(2, min(256, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def make_ours(k, n, silu, m, nc, shared_x=False):
    """nc independent (x, qweight, scales) sets and the call on each. shared_x: one x for all (the weights still
    rotate), as in the decode step, where x is the previous kernel's output and so sits in L2."""
    sets = []
    qt = quantize(torch.randn(n, k, device="cuda"), ENC, BLOCK)
    qw0, sc0 = qt.parts["qweight"], qt.parts["scales"]
    for i in range(nc):
        if i == 0:
            qw, sc = qw0, sc0
        else:  # fresh random bytes are as good as a real quantization for timing, and far quicker
            qw = torch.randint(0, 256, qw0.shape, dtype=torch.uint8, device="cuda")
            sc = (torch.rand(sc0.shape, device="cuda") * 0.02 + 1e-3).half()
        qw, sc, _ = to_layout(LAYOUT[0], qw, sc, None)
        x = sets[0][0] if shared_x and sets else torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        sets.append((x, qw, sc))
    op = quant_linear_silu_mul if silu else (lambda x, q, s, z, **kw: quant_linear(x, q, s, z, None, **kw))
    fns = [(lambda x=x, q=q, s=s: op(x, q, s, None, encoding=ENC, block_size=BLOCK, in_features=k,
                                     layout=LAYOUT[0])) for x, q, s in sets]
    nbytes = qw0.numel() + sc0.numel() * 2 + m * k * 2 + m * (n // 2 if silu else n) * 2
    return fns, nbytes


def check(k, n, silu):
    """Max relative error over M in (1, 64) against the float64 reference; raises on NaN or > 1e-2."""
    worst = 0.0
    qt = quantize(torch.randn(n, k, device="cuda"), ENC, BLOCK)
    p = (qt.parts["qweight"], qt.parts["scales"], None)
    w = dequantize_parts(ENC, parts_of(*p), (n, k), BLOCK, dtype=torch.bfloat16).double()
    p = to_layout(LAYOUT[0], *p)
    for m in (1, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        torch.full((m, n // 2 if silu else n), float("nan"), device="cuda", dtype=torch.bfloat16)  # poison
        ref = x.double() @ w.T
        if silu:
            g, u = ref.chunk(2, dim=-1)
            ref = F.silu(g) * u
            y = quant_linear_silu_mul(x, *p, encoding=ENC, block_size=BLOCK, in_features=k, layout=LAYOUT[0])
        else:
            y = quant_linear(x, *p, None, encoding=ENC, block_size=BLOCK, in_features=k, layout=LAYOUT[0])
        if not torch.isfinite(y).all():
            raise SystemExit(f"FAIL: NaN/Inf in output K={k} N={n} M={m}")
        err = ((y.double() - ref).norm() / ref.norm()).item()
        if err > 1e-2:
            raise SystemExit(f"FAIL: rel err {err:.2e} K={k} N={n} M={m}")
        worst = max(worst, err)
    return worst


def bench_shape(name, k, n, silu, ms, rows, copy_bw):
    w_bf16_bytes = n * k * 2
    nc_b = copies_for(w_bf16_bytes)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(nc_b)]
    # torch's int4 (tinygemm) layout: uint8 (N, K/2) -> packed; scales+zeros (K/128, N, 2) bf16
    nc_i = copies_for(n * k // 2)
    i4 = []
    for _ in range(nc_i):
        raw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        i4.append((torch._convert_weight_to_int4pack(raw, 8),
                   (torch.rand(k // 128, n, 2, device="cuda") * 0.01).to(torch.bfloat16)))
    for m in ms:
        fns, nbytes = make_ours(k, n, silu, m, copies_for(n * k // 2))
        t_ours = ms_graph(fns)
        diag = kernel_facts(ops.LAST["gemv" if m == 1 else "gemm"])
        diag["config"] = dict(ops.LAST["gemv_cfg" if m == 1 else "gemm_cfg"])
        if m > 1:
            diag["split_k"] = ops.LAST["gemm_split"]
        t_eager = ms_eager(fns[0]) if m == 1 else None
        # the fastest any kernel reads these bytes, timed the same way (read_floor.py; round 17)
        fl = floor_us(nbytes) if m == 1 and FLOOR[0] else None
        t_hot = None
        if m == 1:  # x not rotated (L2-resident, as the previous kernel's output is in the decode step)
            hot, _ = make_ours(k, n, silu, m, copies_for(n * k // 2), shared_x=True)
            t_hot = ms_graph(hot)
            del hot
        t_nopdl = None
        if m == 1 and pdl.pdl_enabled(0):  # the same calls launched without programmatic dependent launch
            os.environ["QRUN_PDL"] = "0"
            pdl.pdl_enabled.cache_clear()
            t_nopdl = ms_graph(fns)
            del os.environ["QRUN_PDL"]
            pdl.pdl_enabled.cache_clear()
        del fns
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(nc_b, nc_i))]
        t_cublas = ms_graph([lambda x=xs[i], w=w: F.linear(x, w) for i, w in enumerate(ws)])
        try:
            t_i4 = ms_graph([lambda x=xs[i], w=w, sz=sz: torch._weight_int4pack_mm(x, w, 128, sz)
                             for i, (w, sz) in enumerate(i4)])
        except RuntimeError as e:  # noqa: PERF203
            print(f"  int4pack failed at {name} M={m}: {e}".splitlines()[0])
            t_i4 = None
        gbs = nbytes / (t_ours * 1e-3) / 1e9
        rows.append(dict(shape=name, layout=LAYOUT[0], K=k, N=n, M=m, ours_us=t_ours * 1e3, ours_eager_us=None if t_eager is None
                         else t_eager * 1e3, bytes=nbytes, GBps=gbs, pct_copy=100 * gbs * 1e9 / copy_bw,
                         nopdl_us=None if t_nopdl is None else t_nopdl * 1e3,
                         hotx_us=None if t_hot is None else t_hot * 1e3, cublas_us=t_cublas * 1e3, x_cublas=t_cublas / t_ours,
                         int4pack_us=None if t_i4 is None else t_i4 * 1e3,
                         x_int4pack=None if t_i4 is None else t_i4 / t_ours,
                         TFLOPs=2 * m * n * k / (t_ours * 1e-3) / 1e12, diag=diag,
                         floor_us=None if fl is None else fl["us"], floor=fl,
                         floor_pct_copy=None if fl is None else 100 * nbytes / (fl["us"] * 1e-6) / copy_bw))
        r = rows[-1]
        print(f"  {name:14s} M={m:5d} ours {r['ours_us']:8.2f} us (no PDL {r['nopdl_us'] or 0:.2f}, x in L2 "
              f"{r['hotx_us'] or 0:.2f})  "
              f"{gbs:7.0f} GB/s  {r['pct_copy']:5.1f}%  "
              f"cuBLAS {r['cublas_us']:8.2f} us (x{r['x_cublas']:.2f})  int4pack "
              f"{'-' if t_i4 is None else f'{t_i4 * 1e3:8.2f}'} us  "
              + ("" if fl is None else f"read floor {fl['us']:.2f} us ({r['floor_pct_copy']:.1f}% of copy)  ")
              + f"{diag}", flush=True)
        del xs
    del ws, i4
    torch.cuda.empty_cache()


def sweep_gemv4(shapes):
    """M = 1: time every word-GEMV candidate config on each shape (graph, rotated copies); -> printable lines."""
    lines = []
    for name, k, n, silu in shapes:
        if name not in SWEEP:
            continue
        LAYOUT[0] = layout_for(CHOICE[0], name, n)
        attr = {"il4": "_il4_candidates", "tc16": "_tc16_candidates", "rows": "_gemv4_candidates"}[LAYOUT[0]]
        orig = getattr(ops, attr)
        nb = -(-k // BLOCK)
        res = []
        mma = ops._mma_ok(torch.cuda.current_device(), "int4_sym", BLOCK, torch.bfloat16)
        for cfg in {"il4": lambda: orig(nb, mma=mma), "tc16": lambda: orig(every=True),
                    "rows": lambda: orig(BLOCK, nb)}[LAYOUT[0]]():
            setattr(ops, attr, lambda *a, c=cfg, **kw: [c])
            # the launcher's cache would hand back the config tuned by the correctness check (until round 4
            # it did, and every config of the sweep timed the same kernel: PERF.md)
            ops._tuned.clear()
            fns = None
            try:
                fns, _ = make_ours(k, n, silu, 1, copies_for(n * k // 2))
                t = ms_graph(fns) * 1e3
            except Exception as e:  # noqa: BLE001  (a config the compiler rejects)
                t = float("nan")
                print(f"  {name} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            finally:
                setattr(ops, attr, orig)
            res.append((t, cfg))
            del fns
        res.sort(key=lambda r: (math.isnan(r[0]), r[0]))
        # the best without an L2 prefetch too (il4's PF, round 9), to tell what the prefetch adds
        no_pf = next((f"  best PF 0: {t:.2f}us" for t, c in res if not c.get("PF")), "")
        # and the best of each GEMV kind (il4 and the tensor-core one, gemv_mma.py) when both are offered
        no_pf += next((f"  best MMA: {t:.2f}us " + "/".join(str(v) for v in c.values()) for t, c in res
                       if c.get("MMA")), "")
        no_pf += next((f"  best il4: {t:.2f}us " + "/".join(str(v) for v in c.values()) for t, c in res
                       if "R4" in c), "")
        lines.append(f"{name:14s} " + "  ".join(
            f"{t:.2f}us " + "/".join(str(v) for key, v in c.items() if key != "num_stages") for t, c in res[:6])
            + no_pf)
        print("  sweep " + lines[-1], flush=True)
    return lines


def sweep_gemm(shapes, m):
    """M > 16: time every GEMM candidate config (ops._gemm_candidates) on each shape, graph, rotated copies;
    -> printable lines, fastest first. Round 11 (docs/PERF.md): which tile wins at M = 1024, and whether the
    configs with several CTAs a SM beat the one 8-warp CTA of 128 x 256."""
    lines = []
    orig = ops._gemm_candidates
    for name, k, n, silu in shapes:
        LAYOUT[0] = layout_for(CHOICE[0], name, n)
        res = []
        for cfg in orig(m, BLOCK, LAYOUT[0]):
            ops._gemm_candidates = lambda *a, c=cfg, **kw: [c]
            ops._tuned.clear()
            fns = None
            try:
                fns, _ = make_ours(k, n, silu, m, copies_for(n * k // 2))
                t = ms_graph(fns) * 1e3
            except Exception as e:  # noqa: BLE001  (a config the compiler rejects)
                t = float("nan")
                print(f"  {name} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            finally:
                ops._gemm_candidates = orig
            res.append((t, cfg))
            del fns
        ops._tuned.clear()
        res.sort(key=lambda r: (math.isnan(r[0]), r[0]))
        lines.append(f"{name:14s} M={m} " + "  ".join(
            f"{t:.1f}us {c['BLOCK_N']}x{c['BLOCK_M']}x{c['BLOCK_K']}/{c['num_warps']}w{c['num_stages']}s"
            + ("" if c["SWAP"] else "/noswap")
            + (f"/ws{c['QSTAGES']}q{c['WSTAGES']}w" if c.get("WS") else "/wg" if c.get("WG") else "") for t, c in res))
        print("  gemm sweep " + lines[-1], flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--m", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape names to keep")
    ap.add_argument("--quick", action="store_true", help="M = 1 and 1024 only (saves device time)")
    ap.add_argument("--sweep", action="store_true", help="first time every word-GEMV config at M = 1")
    ap.add_argument("--gemm-sweep", type=int, default=0, metavar="M",
                    help="first time every GEMM config at this M (> 16)")
    ap.add_argument("--layout", default="auto", choices=("auto", "il4", "tc16", "rows"),
                    help="weight layout of ours (auto: the loader's default, il4)")
    ap.add_argument("--no-floor", action="store_true", help="skip the read floor of each M = 1 shape")
    args = ap.parse_args()
    CHOICE[0] = args.layout
    FLOOR[0] = not args.no_floor
    ms = [1, 1024] if args.quick else [int(v) for v in args.m.split(",")]
    shapes = [s for s in SHAPES if not args.shapes or any(p in s[0] for p in args.shapes.split(","))]
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, encoding=ENC, block_size=BLOCK, layout=args.layout)
    print(meta, flush=True)

    print("correctness (M = 1, 64; float64 reference):", flush=True)
    for name, k, n, silu in shapes:
        LAYOUT[0] = layout_for(args.layout, name, n)
        print(f"  {name:14s} {LAYOUT[0]:5s} max rel err {check(k, n, silu):.2e}", flush=True)

    # Launched eagerly, as qrun bench does: captured in a CUDA graph (until round 7) the copy became a memcpy
    # node, ~2430 GB/s on the H100 against ~2950 eager, and every % of copy printed was ~20% too generous.
    copy_bw = copy_bandwidth(torch.device("cuda"), 2 << 30) * 1e9
    dummy = torch.empty(1, device="cuda")
    empty_graph = ms_graph([lambda: _empty_kernel[(1,)](dummy)] * 200) * 1e3
    empty_eager = ms_eager(lambda: _empty_kernel[(1,)](dummy)) * 1e3
    meta.update(copy_GBps=copy_bw / 1e9, empty_launch_graph_us=empty_graph, empty_launch_eager_us=empty_eager)
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read+write); empty launch: graph {empty_graph:.2f} us, "
          f"eager {empty_eager:.2f} us", flush=True)

    sweep = sweep_gemv4(shapes) if args.sweep else []
    if args.gemm_sweep:
        sweep += sweep_gemm(shapes, args.gemm_sweep)

    rows = []
    for name, k, n, silu in shapes:
        LAYOUT[0] = layout_for(args.layout, name, n)
        bench_shape(name, k, n, silu, ms, rows, copy_bw)

    out = args.json or (os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    print(f"\n{meta['device']}, copy {copy_bw / 1e9:.0f} GB/s, empty launch {empty_graph:.2f} us (graph) / "
          f"{empty_eager:.2f} us (eager); ours = {ENC} B={BLOCK} bf16 layout {args.layout}, times per call inside a "
          "CUDA graph")
    print(f"{'shape':14s} {'K->N':>12s} {'M':>5s} {'ours us':>8s} {'noPDL':>7s} {'xL2':>6s} {'eager':>7s} {'GB/s':>6s} {'%copy':>6s} "
          f"{'cuBLAS':>8s} {'x':>5s} {'int4pk':>8s} {'x':>5s} {'TFLOP/s':>7s} {'floor':>7s} {'fl%cp':>6s} {'fl/us':>6s}")
    for r in rows:
        i4 = "-" if r["int4pack_us"] is None else f"{r['int4pack_us']:8.2f}"
        xi4 = "-" if r["x_int4pack"] is None else f"{r['x_int4pack']:5.2f}"
        eg = "" if r["ours_eager_us"] is None else f"{r['ours_eager_us']:7.2f}"
        npdl = "" if r["nopdl_us"] is None else f"{r['nopdl_us']:7.2f}"
        hx = "" if r.get("hotx_us") is None else f"{r['hotx_us']:6.2f}"
        print(f"{r['shape']:14s} {str(r['K']) + '->' + str(r['N']):>12s} {r['M']:5d} {r['ours_us']:8.2f} "
              f"{npdl:>7s} {hx:>6s} {eg:>7s} {r['GBps']:6.0f} {r['pct_copy']:6.1f} {r['cublas_us']:8.2f} {r['x_cublas']:5.2f} "
              f"{i4:>8s} {xi4:>5s} {r['TFLOPs']:7.1f}"
              + ("" if r["floor_us"] is None else
                 f" {r['floor_us']:7.2f} {r['floor_pct_copy']:6.1f} {r['floor_us'] / r['ours_us']:6.2f}"))
    if sweep:
        print("GEMV configs at M = 1 (time, then the config's values: il4 R4/G/warps, rows BLOCK_N/G/PER_SM/warps) "
              "and GEMM configs (BLOCK_N x BLOCK_M x BLOCK_K / warps, stages), fastest first:")
        print("\n".join(sweep))


if __name__ == "__main__":
    main()
