"""L2 prefetch for the decode GEMVs (Hopper's bulk copy engine): a hint that brings a byte range into L2.

Why: at M = 1 a GEMV program keeps only its next one or two steps of weights in flight, in registers, so a 7B
GEMV with few rows a program (down: 896 programs of 4 rows walking K = 18944) waits on HBM's latency every
step and reached 51% of the copy bandwidth (docs/PERF.md round 8). One `cp.async.bulk.prefetch.L2` asks the
copy engine for a whole range at once and holds no register, so a program can put its whole share of the
weights (or a window far ahead of its loads) in flight; its own loads then mostly hit L2, whose latency is a
fraction of HBM's. Issued before `gdc_wait`, it also overlaps the previous kernel's tail.

A prefetch changes no result: the GEMV reads the same bytes with ordinary loads afterwards. Off under the CPU
interpreter (no PTX there) and wherever a kernel's PF constexpr is 0.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def l2_prefetch(lo, hi):
    """Prefetch the bytes from pointer lo up to pointer hi (scalars, same tensor; nothing when hi <= lo) into L2,
    widened to 16-byte alignment as the instruction needs. One thread of the program issues it."""
    a = lo.to(tl.int64)
    b = hi.to(tl.int64)
    start = a & ~15
    n = ((b + 15) & ~15) - start
    n = tl.where(b > a, n, 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; setp.gt.and.s32 p, $2, 0, p; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [start, n], dtype=tl.int32, is_pure=False, pack=1)
