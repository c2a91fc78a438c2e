"""The decode step as one CUDA graph.

At batch 1 a decode step is hundreds of small kernels (two or three per linear, norms, RoPE, attention);
launched one by one from Python they cost ~10 us each, more than the 0.5B model's whole weight read. Captured
once and replayed, the launches cost ~1 us each and no Python runs per layer.

The model's decode shapes are static (token (B, 1), input_pos (1,), KV cache (B, KV, max_seq, hd)), so one
capture per batch size serves every position: the position lives in a device tensor the graph reads.
"""
from __future__ import annotations

from typing import Callable

import torch


class GraphedDecodeStep:
    """Callable (token (B, 1) long, input_pos (1,) long) -> logits (B, V) float32, replaying a CUDA graph.

    The first call for a batch size warms up (Triton autotuning and lazy initialisation must happen outside
    capture) and captures. Warm-up runs the real step on the real inputs, so the KV-cache entries it writes
    are exactly those the replay writes again: no state is disturbed. The returned logits live in the
    graph's static output buffer: consume them before the next call.
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], warmup: int = 2):
        self.step = step
        self.warmup = warmup
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pool = None  # one memory pool shared by the graphs of every batch size

    @torch.inference_mode()
    def _capture(self, token: torch.Tensor, input_pos: torch.Tensor):
        static_tok, static_pos = token.clone(), input_pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(self.warmup):
                self.step(static_tok, static_pos)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self.step(static_tok, static_pos)
        if self.pool is None:
            self.pool = g.pool()
        entry = (g, static_tok, static_pos, out)
        self.graphs[token.shape[0]] = entry
        return entry

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        entry = self.graphs.get(token.shape[0])
        if entry is None:
            entry = self._capture(token, input_pos)
        g, static_tok, static_pos, out = entry
        static_tok.copy_(token, non_blocking=True)
        static_pos.copy_(input_pos, non_blocking=True)
        g.replay()
        return out
