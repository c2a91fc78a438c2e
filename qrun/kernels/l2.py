"""L2 prefetch for the decode GEMVs (Hopper's bulk copy engine): a hint that brings a byte range into L2.

Why: at M = 1 a GEMV program keeps only its next one or two steps of weights in flight, in registers, so a 7B
GEMV with few rows a program (down: 896 programs of 4 rows walking K = 18944) waits on HBM's latency every
step and reached 51% of the copy bandwidth (docs/PERF.md round 8). One `cp.async.bulk.prefetch.L2` asks the
copy engine for a whole range at once and holds no register, so a program can put its whole share of the
weights (or a window far ahead of its loads) in flight; its own loads then mostly hit L2, whose latency is a
fraction of HBM's. Issued before `gdc_wait`, it also overlaps the previous kernel's tail.

A prefetch changes no result: the GEMV reads the same bytes with ordinary loads afterwards. Off under the CPU
interpreter (no PTX there) and wherever a kernel's PF constexpr is 0.

`l2_prefetch_share` is the same hint for another kernel's bytes: a kernel that leaves HBM idle (the RoPE +
cache write, whose programs move a few KB) warms L2 with the weights of a GEMV that runs a few microseconds
later, so that GEMV (latency-bound at 7B o and qkv: 34-40% of copy alone) reads L2 instead of waiting on HBM.
The kernel knows only byte ranges; which ranges is the caller's choice (PERF.md attempt 47).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def l2_prefetch(lo, hi):
    """Prefetch the bytes from pointer lo up to pointer hi (scalars, same tensor; nothing when hi <= lo) into L2,
    widened to 16-byte alignment as the instruction needs. One thread of the program issues it."""
    _prefetch_bytes(lo.to(tl.int64), hi.to(tl.int64))


@triton.jit
def _prefetch_bytes(a, b):
    """The bulk prefetch of addresses [a, b) (int64 scalars), widened to 16-byte alignment; thread 0 issues it."""
    start = a & ~15
    n = ((b + 15) & ~15) - start
    n = tl.where(b > a, n, 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; setp.gt.and.s32 p, $2, 0, p; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [start, n], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def l2_prefetch_ranges(desc_ptr, NR: tl.constexpr, pid, nprog):
    """Program pid of nprog prefetches its share of each of the NR byte ranges described at desc_ptr: (NR, 2)
    int64, (address, bytes) a row (made by `l2_ranges`); nprog programs together put them all in flight."""
    for r in tl.static_range(NR):
        a = tl.load(desc_ptr + 2 * r)
        nbytes = tl.load(desc_ptr + 2 * r + 1)
        share = ((nbytes + nprog - 1) // nprog + 15) // 16 * 16
        lo = a + pid * share
        _prefetch_bytes(lo, tl.minimum(lo + share, a + nbytes))


def l2_ranges(tensors) -> torch.Tensor | None:
    """Tensors (on one CUDA device; they must outlive the result and never move) -> the (R, 2) int64 range
    descriptor `l2_prefetch_ranges` reads, on their device; None for no tensors. Made once, outside graph
    capture: it copies from the host."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return None
    rows = [[t.data_ptr(), t.numel() * t.element_size()] for t in ts]
    return torch.tensor(rows, dtype=torch.int64, device=ts[0].device)
