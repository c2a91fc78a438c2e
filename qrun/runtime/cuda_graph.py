"""The decode step as one CUDA graph.

At batch 1 a decode step is hundreds of small kernels (two or three per linear, norms, RoPE, attention);
launched one by one from Python they cost ~10 us each, more than the 0.5B model's whole weight read. Captured
once and replayed, the launches cost ~1 us each and no Python runs per layer.

The model's decode shapes are static (token (B, 1), input_pos (1,), KV cache (B, KV, max_seq, hd)), so one
capture per batch size serves every position: the position lives in a device tensor the graph reads.

The captured region also picks the greedy token and advances: after the model it writes argmax(logits) into
the static token buffer it read and adds 1 to the static position. A greedy decode loop therefore replays the
graph with no input copies at all, and can enqueue step N+1 before the host has read token N (`start` /
`advance`, the run-ahead protocol of qrun.runtime.generate.run_ahead). Called as a function (token, pos) ->
logits it copies its inputs in first, so the in-graph argmax and increment are simply overwritten: other
sampling settings use the same graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qrun import kernels
from qrun.runtime.sampling import greedy

RING = 4  # pinned host slots per batch size: how many sampled tokens may be in flight unread


@dataclass
class _Graph:
    """One captured step for one batch size B."""
    graph: torch.cuda.CUDAGraph
    tok: torch.Tensor  # (B, 1) long: the step's input token, overwritten by its argmax
    pos: torch.Tensor  # (1,) long: the step's position, incremented by the step
    out: torch.Tensor  # (B, V) float32 logits
    host: torch.Tensor  # (RING, B) long, pinned: tokens copied back for the host
    events: list  # RING torch.cuda.Event: slot i's copy has landed
    slot_seq: list = field(default_factory=lambda: [-1] * RING)  # which read each slot holds now
    reads: int = 0  # reads enqueued so far


class PendingIds:
    """The ids (B,) one run-ahead step produced, on their way to pinned host memory; .ids() waits for them."""

    def __init__(self, entry: _Graph, slot: int, seq: int):
        self.entry, self.slot, self.seq = entry, slot, seq

    def ids(self) -> list[int]:
        e = self.entry
        if e.slot_seq[self.slot] != self.seq:  # more than RING reads were enqueued before this one was taken
            raise RuntimeError("run-ahead token read after its host slot was reused")
        e.events[self.slot].synchronize()  # waits for this step only, not for the ones queued after it
        return e.host[self.slot].tolist()


class GraphedDecodeStep:
    """Callable (token (B, 1) long, input_pos (1,) long) -> logits (B, V) float32, replaying a CUDA graph;
    and the run-ahead greedy step: start(token (B,), pos) then advance(), each returning PendingIds.

    The first use for a batch size warms up (Triton autotuning and lazy initialisation must happen outside
    capture) and captures. Warm-up runs the real step on the real inputs, restoring the token and position the
    step overwrites after each run, so the KV-cache entries it writes are exactly those the first replay
    writes again: no state is disturbed. The returned logits live in the graph's static output buffer:
    consume them before the next call. Calls and a run-ahead sequence of the same batch size share the static
    buffers: do not interleave them.
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], warmup: int = 2):
        self.step = step
        self.warmup = warmup
        self.graphs: dict[int, _Graph] = {}
        self.pool = None  # one memory pool shared by the graphs of every batch size
        self.current: _Graph | None = None  # the batch size a run-ahead sequence runs at

    def _body(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.step(tok, pos)  # (B, V) float32
        # tok is read by the embedding above, so written only now
        if logits.is_cuda and kernels.argmax_advance is not None:
            kernels.argmax_advance(logits, tok, pos)  # one kernel for the three lines below
        else:
            tok.copy_(greedy(logits).view(-1, 1))
            pos.add_(1)
        return logits

    @torch.inference_mode()
    def _capture(self, token: torch.Tensor, input_pos: torch.Tensor) -> _Graph:
        static_tok, static_pos = token.clone(), input_pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(self.warmup):
                self._body(static_tok, static_pos)
                static_tok.copy_(token)
                static_pos.copy_(input_pos)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):  # records only: the buffers keep the restored inputs
            out = self._body(static_tok, static_pos)
        if self.pool is None:
            self.pool = g.pool()
        b = token.shape[0]
        entry = _Graph(g, static_tok, static_pos, out,
                       host=torch.empty(RING, b, dtype=torch.long, pin_memory=True),
                       events=[torch.cuda.Event() for _ in range(RING)])
        self.graphs[b] = entry
        return entry

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        entry = self.graphs.get(token.shape[0])
        if entry is None:
            entry = self._capture(token, input_pos)
        entry.tok.copy_(token, non_blocking=True)
        entry.pos.copy_(input_pos, non_blocking=True)
        entry.graph.replay()
        return entry.out

    # ----------------------------------------------------------------------------------- run-ahead
    @torch.inference_mode()
    def start(self, token: torch.Tensor, pos: int) -> PendingIds:
        """token (B,) long on the device (the first sampled token), pos: the cache position it occupies.
        Loads the static buffers (device-side, no sync) and returns that token's host read."""
        tok = token.view(-1, 1)
        entry = self.graphs.get(tok.shape[0])
        if entry is None:
            entry = self._capture(tok, torch.full((1,), pos, dtype=torch.long, device=tok.device))
        entry.tok.copy_(tok)
        entry.pos.fill_(pos)
        self.current = entry
        return self._read(entry)

    @torch.inference_mode()
    def advance(self) -> PendingIds:
        """Enqueue one step: the current token at the current position through the model; its argmax becomes
        the current token and the position advances, all on the device. Returns the new token's host read."""
        entry = self.current
        entry.graph.replay()
        return self._read(entry)

    def _read(self, e: _Graph) -> PendingIds:
        slot, seq = e.reads % RING, e.reads
        e.reads += 1
        e.slot_seq[slot] = seq
        e.host[slot].copy_(e.tok.view(-1), non_blocking=True)  # (B,) into pinned memory, queued after the step
        e.events[slot].record()
        return PendingIds(e, slot, seq)
