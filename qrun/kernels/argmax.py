"""The greedy decode step's last kernel: token = argmax(logits), position += 1, in one launch.

Why: torch's argmax over a 152k vocabulary is one reduce kernel of 19 blocks that took ~13 us of the Qwen2.5-7B
graph step, and the copy of the id into the step's input token and the position's increment are two more
launches (profile_decode.py --graph, docs/PERF.md round 9). Here many programs each reduce a slice of a row to
one int64 key and fold it into the row's slot with an atomic max; the last program to arrive (an arrival
counter, as in the split-K GEMVs) writes the ids, resets the slots and the counter, and advances the position.

The key orders as (logit, -index): float32 bits made monotone as a signed int32 in the high word, and
2^31 - 1 - index in the low word, so the largest logit wins and, among equal logits, the first index, as
torch.argmax. (A NaN logit: torch returns its index; here a positive NaN wins too, a negative one does not.)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_enter, pdl_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KEY_MIN = -(1 << 63)
_KEY_MIN = tl.constexpr(KEY_MIN)  # the same, for the kernel
_scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit
def argmax_advance_kernel(
    # logits (B, V) float32 rows of stride stride_l, ids (B,) int64 (written), position (1,) int64 (incremented),
    # slots (>= B,) int64 at KEY_MIN and counter (1,) int32 at 0 between launches
    l_ptr, ids_ptr, pos_ptr, slot_ptr, cnt_ptr,
    B, V, stride_l,
    BLOCK: tl.constexpr, BB: tl.constexpr, PDL: tl.constexpr = False,
):
    """Program (j, b): logits j BLOCK .. (j + 1) BLOCK - 1 of row b."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    if PDL:
        pdl_enter(PDL)
    i = j * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(l_ptr + b.to(tl.int64) * stride_l + i, mask=i < V, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of mono = float order of x
    key = (mono.to(tl.int64) << 32) | (2147483647 - i).to(tl.int64)
    key = tl.where(i < V, key, _KEY_MIN)
    tl.atomic_max(slot_ptr + b, tl.max(key, axis=0), sem="relaxed", scope="gpu")
    tl.debug_barrier()  # the max is in before the counter's release
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:  # the last program: every max is in
        r = tl.arange(0, BB)
        # read and reset each slot in one atomic (the slots' last writes were atomics too)
        best = tl.atomic_xchg(slot_ptr + r, tl.full((BB,), _KEY_MIN, tl.int64), mask=r < B,
                              sem="relaxed", scope="gpu")
        tl.store(ids_ptr + r, 2147483647 - (best & 0xFFFFFFFF), mask=r < B)
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


def _slots(device: torch.device, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots (>= b,) int64 and the arrival counter (1,) int32 of `device`, shared by every launch on it:
    each launch leaves them reset, and launches on one stream do not overlap (as ops._tile_counters; two
    decode loops on two streams of one GPU at once would need their own)."""
    t = _scratch.get(device)
    if t is None or t[0].numel() < b:
        t = _scratch[device] = (torch.full((max(b, 8),), KEY_MIN, dtype=torch.int64, device=device),
                                torch.zeros(1, dtype=torch.int32, device=device))
    return t


@torch.library.custom_op("qrun::argmax_advance", mutates_args=("ids", "pos"))
def argmax_advance(logits: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> None:
    """logits (B, V) float32 -> ids (B,) int64 (or (B, 1)) = argmax over V; pos (1,) int64 += 1."""
    b, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    slots, cnt = _slots(logits.device, b)
    block = 4096 if v >= 4096 * 16 else 1024
    argmax_advance_kernel[(triton.cdiv(v, block), b)](
        logits, ids, pos, slots, cnt, b, v, logits.stride(0), BLOCK=block,
        BB=triton.next_power_of_2(b), num_warps=4, **pdl_kwargs(logits))


@argmax_advance.register_fake
def _(logits, ids, pos):
    return None
