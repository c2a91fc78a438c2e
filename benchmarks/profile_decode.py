"""Where a decode step's GPU time goes, kernel by kernel (run on the GPU machine):

    python3 benchmarks/profile_decode.py MODEL.stcmp [--steps 8] [--pos 300] [--graph]

Loads the model, fills the KV cache to --pos with a prefill, then runs --steps decode steps under
torch.profiler and prints the kernels' time per step, largest first, and their sum.

Eager (default): every kernel is its own launch, timed alone.
--graph: the steps replay the captured CUDA graph, as `qrun bench` runs them. With programmatic dependent
launch a kernel starts before its predecessor ends, so kernel durations overlap and their sum overstates the
step. So each kernel is charged its share of the critical path instead: end - (latest end of the kernels
before it), never negative; the shares sum to the step's span. Kernels are keyed by name and grid, so the
GEMVs of qkv, o, gate+up and down come out as separate rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qrun  # noqa: E402
from qrun.runtime.generate import decode_one, prefill  # noqa: E402


def _kernel_events(prof) -> list[dict]:
    """The profile's GPU kernels (chrome-trace dicts with ts, dur, name, args.grid), in start order."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "trace.json")
        prof.export_chrome_trace(p)
        with open(p) as f:
            trace = json.load(f)
    ev = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    return sorted(ev, key=lambda e: e["ts"])


def critical_path(events: list[dict], steps: int) -> tuple[float, list[tuple[float, float, int, str]]]:
    """events in start order -> (span per step, [(critical us per step, busy us per step, count per step,
    key)]): each kernel's critical share is how far it pushes the latest end forward."""
    crit, busy, count = defaultdict(float), defaultdict(float), defaultdict(int)
    last_end = None
    first = events[0]["ts"]
    for e in events:
        end = e["ts"] + e["dur"]
        key = f"{e['name'][:60]} grid={tuple(e.get('args', {}).get('grid', ()))}"
        start = e["ts"] if last_end is None else last_end  # an idle gap goes to the kernel after it
        crit[key] += max(0.0, end - start)
        busy[key] += e["dur"]
        count[key] += 1
        last_end = end if last_end is None else max(last_end, end)
    span = (last_end - first) / steps
    rows = [(crit[k] / steps, busy[k] / steps, count[k] // steps, k) for k in crit]
    return span, sorted(rows, reverse=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pos", type=int, default=300)
    ap.add_argument("--graph", action="store_true", help="profile CUDA graph replays (critical-path shares)")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    llm = qrun.load(a.model, device="cuda", max_seq_len=a.pos + a.steps + 8, graph=a.graph, progress=False)
    m = llm.model
    prompt = torch.randint(0, m.args.vocab_size, (1, a.pos), device="cuda")
    with torch.inference_mode():
        tok = prefill(m, prompt, torch.arange(a.pos, device="cuda")).argmax(-1)
        pos = torch.tensor([a.pos], device="cuda")
        if a.graph:
            step = llm.greedy_step
            step.start(tok.view(-1), a.pos)  # captures (warm-up included)
            for _ in range(3):
                step.advance()
        else:
            for _ in range(3):  # warm-up: tuning, compilation
                decode_one(m, tok.view(1, 1), pos)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                if a.graph:
                    step.advance()
                else:
                    tok = decode_one(m, tok.view(1, 1), pos).argmax(-1)
                    pos += 1
            torch.cuda.synchronize()
    if a.graph:
        ev = _kernel_events(prof)
        if not ev:
            sys.exit("profile_decode: the profiler recorded no kernels inside the graph replays")
        span, rows = critical_path(ev, a.steps)
        total = sum(r[0] for r in rows)
        print(f"{a.model}: {span:.0f} us per step from first kernel start to last end (graph, position {a.pos}); "
              f"critical shares sum to {total:.0f} us")
        print(f"{'critical us':>11} {'busy us':>9} {'n':>4} {'each':>7}  kernel")
        for c, b, n, k in rows[:a.top]:
            print(f"{c:11.1f} {b:9.1f} {n:4d} {c / max(n, 1):7.2f}  {k[:110]}")
        return
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / a.steps, e.count // a.steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"{a.model}: {total:.0f} us of kernel time per decode step (eager, position {a.pos})")
    for t, n, k in rows[:a.top]:
        print(f"{t:9.1f} us  {n:4d}x  {t / max(n, 1):7.2f} us each  {k[:90]}")


if __name__ == "__main__":
    main()
