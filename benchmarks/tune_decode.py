"""Pick each decode GEMV's config by timing the whole CUDA-graph decode step (run on the GPU machine):

    python3 benchmarks/tune_decode.py MODEL.stcmp [--prompt-len 128] [--steps 64] [--passes 1]

Why: the launcher's tuner times each config in a chain of launches of itself (ops._pick_chain). In the decode
step a GEMV runs after other kernels, with programmatic dependent launch letting it start early, and the
chain's pick is not always the step's best: Qwen2-0.5B decode came out at ~1490 or ~1740 tok/s from process
to process with the same code (docs/PERF.md, round 8), and a graph profile put the difference on the
gate+up GEMV (8.8 us a layer in the step against 4.8 us in its chain).

So: load the model, let the launcher tune as usual, then for each M = 1 GEMV shape in turn (coordinate
descent: the others held at their current pick) capture the step with each candidate config and time
--steps run-ahead greedy steps. The best config of each shape is stored in the tuner's on-disk cache
(qrun/kernels/tune_cache.py), so later processes on this machine (qrun bench, qrun generate) start from it.
Prints one line per shape and config, and the step time before and after.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qrun  # noqa: E402
from qrun.kernels import ops  # noqa: E402
from qrun.runtime.generate import prefill  # noqa: E402


def candidates(key: tuple) -> list[dict]:
    """The launcher's candidate configs for a tuned GEMV key (dev, kind, encoding, block, x dtype, scale dtype,
    n, k, ...); [] for kinds this script does not tune (the M > 1 GEMM)."""
    kind = key[1]
    if kind not in ("gemv_il4", "gemv_tc16", "gemv4", "gemv"):
        return []
    enc, bs, k = key[2], key[3], key[7]
    nb = -(-k // bs)
    if kind == "gemv_il4":
        return ops._il4_candidates(nb)
    if kind == "gemv_tc16":
        return ops._tc16_candidates()
    if kind == "gemv4":
        return ops._gemv4_candidates(bs, nb)
    if kind == "gemv":
        return ops._gemv_candidates(enc, bs, nb)
    return []


def step_ms(llm, first: torch.Tensor, pos: int, steps: int) -> float:
    """Capture the decode step afresh (the current picks) and time `steps` run-ahead greedy steps: ms a step."""
    g = llm.greedy_step
    g.graphs.clear()
    g.current = None
    g.start(first, pos)
    for _ in range(3):
        g.advance()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(2):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.start(first, pos)
        e0.record()
        for _ in range(steps):
            g.advance()
        e1.record()
        e1.synchronize()
        best = min(best, e0.elapsed_time(e1) / steps)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--passes", type=int, default=1)
    a = ap.parse_args()
    t0 = time.perf_counter()
    llm = qrun.load(a.model, device="cuda", max_seq_len=a.prompt_len + 2 * a.steps + 16, progress=False)
    if llm.greedy_step is None:
        sys.exit("tune_decode: needs the CUDA graph decode step")
    m = llm.model
    prompt = torch.randint(0, m.args.vocab_size, (1, a.prompt_len), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        first = prefill(m, prompt, torch.arange(a.prompt_len, device="cuda")).argmax(-1)  # (1,)
        base = step_ms(llm, first, a.prompt_len, a.steps)  # also makes the launcher tune every shape
        print(f"{a.model}: {base * 1e3:.1f} us a step with the chain tuner's picks ({1e3 / base:.1f} tok/s)",
              flush=True)
        keys = [k for k in ops._tuned if candidates(k)]
        for p in range(a.passes):
            for key in keys:
                cur = ops._tuned[key]
                results = []
                for c in candidates(key):
                    ops._tuned[key] = c
                    try:
                        t = step_ms(llm, first, a.prompt_len, a.steps)
                    except Exception as e:  # a config that does not compile or launch here
                        print(f"   {c}: failed ({type(e).__name__})")
                        continue
                    results.append((t, c))
                t_best, c_best = min(results, key=lambda r: r[0])
                t_cur = next(t for t, c in results if c == cur)
                # keep the current pick unless another is faster by more than the timing noise (~0.3%)
                pick = c_best if t_best < t_cur * 0.997 else cur
                ops._tuned[key] = pick
                shape = f"{key[1]} {key[7]}->{key[6]}{' silu' * key[9]}{' norm' * key[10]}{' res' * key[11]}"
                print(f"pass {p} {shape}: chain pick {cur} {t_cur * 1e3:.1f} us/step; "
                      f"best {c_best} {t_best * 1e3:.1f}; keep {'best' if pick is c_best else 'chain pick'}",
                      flush=True)
                for t, c in sorted(results, key=lambda r: r[0]):
                    print(f"      {t * 1e3:8.1f} us  {c}")
        for key in keys:
            ops._remember(key, ops._tuned[key])  # into the on-disk cache for later processes
        final = step_ms(llm, first, a.prompt_len, a.steps)
    print(f"{a.model}: {base * 1e3:.1f} -> {final * 1e3:.1f} us a step ({1e3 / base:.1f} -> {1e3 / final:.1f} "
          f"tok/s at position {a.prompt_len}..{a.prompt_len + a.steps}); {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
