"""Pick each decode GEMV's kernel config by timing the whole CUDA-graph decode step (`qrun tune`).

Why: the launcher's tuner (kernels/ops.py, `_pick_chain`) times each candidate config in a chain of launches
of the same kernel. In the decode step a GEMV runs after attention or another GEMV, and programmatic
dependent launch lets it start while its predecessor is still running, so the chain's pick is not always the
step's best. Measured on the H100 (docs/PERF.md, round 8): Qwen2-0.5B's o projection took ~4 us a layer more
with its chain pick than with the step's best, and decode ran at 1470-1490 tok/s against 1782-1789 after
this search; on Qwen2.5-7B it gained 1%.

The search is coordinate descent: for each M = 1 GEMV shape in turn, with the others held at their current
pick, capture the step with each candidate config and time run-ahead greedy steps. A candidate replaces the
current pick only when it is faster by more than the timing noise. The picks go to the tuner's on-disk cache
(kernels/tune_cache.py), so later processes on the same GPU model (qrun bench, qrun generate, apps) use them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qrun.errors import QRunError


@dataclass
class ShapeResult:
    key: tuple
    name: str  # e.g. "gemv_il4 896->896 res"
    before: dict  # the pick the shape had when its turn came
    after: dict  # the pick kept
    times_ms: list[tuple[float, dict]] = field(default_factory=list)  # (step ms, config), fastest first


@dataclass
class TuneResult:
    before_ms: float  # a decode step with the launcher's own picks
    after_ms: float  # with the picks kept
    shapes: list[ShapeResult]
    seconds: float = 0.0


def shape_name(key: tuple) -> str:
    """A tuner key (ops.gemv_keys) as 'kind K->N [silu] [norm] [res]'."""
    return f"{key[1]} {key[7]}->{key[6]}{' silu' * bool(key[9])}{' norm' * bool(key[10])}{' res' * bool(key[11])}"


def descend(keys: list, candidates: Callable[[Any], list], current: dict, measure: Callable[[], float],
            apply: Callable[[Any, Any], None], passes: int = 1, noise: float = 0.003,
            on_shape: Callable[[ShapeResult], None] | None = None,
            name: Callable[[Any], str] = str) -> list[ShapeResult]:
    """Coordinate descent over keys: for each key, apply(key, c) for each of candidates(key), then measure()
    (lower is better, everything else as current holds it), and keep the fastest if it beats the current
    choice by more than `noise` (a fraction); current is updated in place and the kept choice applied.
    A candidate whose measure raises is skipped. Returns one ShapeResult per key and pass."""
    out = []
    for _ in range(passes):
        for key in keys:
            cur = current[key]
            times = []
            for c in candidates(key):
                apply(key, c)
                try:
                    times.append((measure(), c))
                except Exception:  # a config that cannot be captured or launched here
                    continue
            times.sort(key=lambda tc: tc[0])
            t_cur = next((t for t, c in times if c == cur), float("inf"))
            keep = cur
            if times and times[0][0] < t_cur * (1 - noise):
                keep = times[0][1]
            current[key] = keep
            apply(key, keep)
            r = ShapeResult(key, name(key), cur, keep, times)
            out.append(r)
            if on_shape is not None:
                on_shape(r)
    return out


def _step_ms(llm, first: torch.Tensor, pos: int, steps: int) -> float:
    """Capture the decode step afresh (with the current picks) and time `steps` run-ahead greedy steps
    from position pos, twice: ms a step, the better of the two."""
    g = llm.greedy_step
    g.graphs.clear()
    g.current = None
    g.start(first, pos)  # captures
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


@torch.inference_mode()
def tune_decode(llm, prompt_len: int = 128, steps: int = 48, passes: int = 1, store: bool = True,
                on_shape: Callable[[ShapeResult], None] | None = None) -> TuneResult:
    """Search the M = 1 GEMV configs of llm's decode step (a CUDA model loaded with graph=True) as the module
    docstring says; store: keep the picks in the on-disk cache. Positions prompt_len .. prompt_len + steps
    of the KV cache are written (and rewritten by any later prompt). Returns the step times and each shape's
    timings."""
    from qrun.kernels import ops
    from qrun.runtime.generate import prefill

    if llm.device.type != "cuda" or llm.greedy_step is None:
        raise QRunError("tuning times the CUDA graph decode step: load the model on a CUDA device with the graph "
                        "on")
    if prompt_len + steps + 4 > llm.max_seq_len:
        raise QRunError(f"--prompt-len {prompt_len} + --steps {steps} do not fit in max_seq_len "
                        f"{llm.max_seq_len}")
    t0 = time.perf_counter()
    m = llm.model
    gen = torch.Generator(device=llm.device).manual_seed(0)
    prompt = torch.randint(0, m.args.vocab_size, (1, prompt_len), device=llm.device, generator=gen)
    first = prefill(m, prompt, torch.arange(prompt_len, device=llm.device)).argmax(-1)  # (1,)

    def measure() -> float:
        return _step_ms(llm, first, prompt_len, steps)

    before = measure()  # the launcher tunes every shape here, as any first run does
    keys = ops.gemv_keys()
    current = {k: ops.get_config(k) for k in keys}
    shapes = descend(keys, ops.gemv_candidates, current, measure, ops.set_config, passes=passes,
                     on_shape=on_shape, name=shape_name)
    if store:
        for k in keys:
            ops.set_config(k, current[k], store=True)
    after = measure()
    return TuneResult(before, after, shapes, time.perf_counter() - t0)
