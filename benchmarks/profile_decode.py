"""Where a decode step's GPU time goes, kernel by kernel (run on the GPU machine):

    python3 benchmarks/profile_decode.py MODEL.stcmp [--steps 8] [--pos 300]

Loads the model, fills the KV cache to --pos with a prefill, then runs --steps eager decode steps under
torch.profiler (eager so that every kernel is its own profiler event; inside the CUDA graph the same
kernels run, minus the launch gaps and with programmatic dependent launch overlapping neighbours).
Prints the kernels' CUDA time per step, largest first, and their sum.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qrun  # noqa: E402
from qrun.runtime.generate import decode_one, prefill  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pos", type=int, default=300)
    a = ap.parse_args()
    llm = qrun.load(a.model, device="cuda", max_seq_len=a.pos + a.steps + 8, graph=False, progress=False)
    m = llm.model
    prompt = torch.randint(0, m.args.vocab_size, (1, a.pos), device="cuda")
    with torch.inference_mode():
        tok = prefill(m, prompt, torch.arange(a.pos, device="cuda")).argmax(-1)
        pos = torch.tensor([a.pos], device="cuda")
        for _ in range(3):  # warm-up: tuning, compilation
            decode_one(m, tok.view(1, 1), pos)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                tok = decode_one(m, tok.view(1, 1), pos).argmax(-1)
                pos += 1
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / a.steps, e.count // a.steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"{a.model}: {total:.0f} us of kernel time per decode step (eager, position {a.pos})")
    for t, n, k in rows[:25]:
        print(f"{t:9.1f} us  {n:4d}x  {t / max(n, 1):7.2f} us each  {k[:90]}")


if __name__ == "__main__":
    main()
