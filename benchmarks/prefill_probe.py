"""Where a prefill's time goes, host or device (GPU only). docs/PERF.md attempt 75 saw the 7B prefill of 1024
tokens spread 14071-28545 tok/s between processes with the same kernels; this tells whether a slow process is
slow on the GPU or in Python.

    python3 benchmarks/prefill_probe.py MODEL.stcmp [--len 1024] [--runs 5] [--profile]

Per run: the host's time to enqueue the prefill (prefill() returning, nothing synchronized), the wall time to
its end (synchronized), and the GPU time between CUDA events around it. Then three runs behind a ~0.3 s sleep
kernel, so that the enqueue time is the host's alone (a prefill that waited for the GPU would return after the
sleep), with the allocator's device allocs, frees and retries over them. With --profile, one more run under
torch.profiler: the kernels' GPU time summed by name; with --cprofile, one under cProfile (the host's time by
function). One JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qrun  # noqa: E402
from qrun.runtime.generate import prefill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--len", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cprofile", action="store_true", help="one more run under cProfile: the host's time by function")
    a = ap.parse_args()
    llm = qrun.load(a.model, device="cuda", max_seq_len=a.len + 16)
    model = llm.model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (1, a.len), generator=g).cuda()
    pos = torch.arange(a.len, device="cuda")
    rows = []
    with torch.inference_mode():
        for i in range(a.runs + 1):  # run 0: warm-up (tuning, compiles)
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            prefill(model, prompt, pos)
            e1.record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            r = dict(run=i, enqueue_ms=(t1 - t0) * 1e3, wall_ms=(t2 - t0) * 1e3, gpu_ms=e0.elapsed_time(e1))
            rows.append(r)
            print(f"run {i}: enqueue {r['enqueue_ms']:7.2f} ms  wall {r['wall_ms']:7.2f} ms  gpu {r['gpu_ms']:7.2f} ms"
                  f"  -> {a.len / r['wall_ms'] * 1e3:8.0f} tok/s", flush=True)
        # the host alone: the GPU kept busy by a sleep kernel first (~0.3 s), so that prefill() returns as soon as
        # it has enqueued everything, unless something in it waits for the GPU (then it returns after the sleep)
        ms = torch.cuda.memory_stats()
        for i in range(3):
            torch.cuda.synchronize()
            torch.cuda._sleep(int(5e8))
            t0 = time.perf_counter()
            prefill(model, prompt, pos)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            print(f"behind a 0.3 s sleep: enqueue {(t1 - t0) * 1e3:7.2f} ms (wall {(time.perf_counter() - t0) * 1e3:7.2f}"
                  " ms)", flush=True)
        ms2 = torch.cuda.memory_stats()
        print("allocator during those: " + ", ".join(f"{k} +{ms2.get(k, 0) - ms.get(k, 0)}" for k in
              ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")), flush=True)
        out = {k: statistics.median(r[k] for r in rows[1:]) for k in ("enqueue_ms", "wall_ms", "gpu_ms")}
        out["tok_s"] = a.len / out["wall_ms"] * 1e3
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                prefill(model, prompt, pos)
                torch.cuda.synchronize()
            tot = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    name = ev.name[:60]
                    tot[name] = tot.get(name, 0.0) + ev.device_time
            top = sorted(tot.items(), key=lambda kv: -kv[1])[:12]
            print(f"GPU kernels in one prefill: {sum(tot.values()) / 1e3:.2f} ms in all", flush=True)
            for name, us in top:
                print(f"  {us / 1e3:8.3f} ms  {name}", flush=True)
            out["kernels_ms"] = sum(tot.values()) / 1e3
        if a.cprofile:
            import cProfile
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            prefill(model, prompt, pos)
            torch.cuda.synchronize()
            pr.disable()
            st = pstats.Stats(pr)
            st.sort_stats("tottime").print_stats(25)
            st.sort_stats("cumulative").print_stats(30)
    from qrun.kernels import ops
    out["gemm_configs"] = {repr(k): v for k, v in ops._tuned.items() if k[1] == "gemm"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
