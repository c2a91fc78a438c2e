"""Programmatic dependent launch (PDL, Hopper and later): the next kernel of the decode step starts while the
one before it finishes, so its weight loads (which depend on nothing computed in the step) overlap the tail
of the previous kernel instead of waiting behind it.

Protocol every qrun decode kernel follows when launched with PDL:
  1. load what no earlier kernel writes (packed weights, scales, the position tensor is NOT one of these);
  2. gdc_wait(): block until the previous kernel in the stream has finished and its writes are visible;
  3. gdc_launch_dependents(): let the next kernel's programs start their own step 1;
  4. everything else: reads of activations, all writes.
Writes only ever happen after step 2, so a kernel never overwrites a buffer the previous one still reads.
A kernel that skips gdc_wait must not be launched with PDL (it would race). Launches of torch's own kernels
in between carry no PDL attribute and serialise as usual; inside a CUDA graph the dependency becomes a
programmatic edge.

QRUN_PDL=0 turns it off (for A/B timing). Off on the CPU interpreter, before sm_90, and on triton versions
without `launch_pdl`.

QRUN_PDL_EARLY=1 swaps steps 2 and 3 (docs/PERF.md round 11): a kernel lets the next one in as soon as all its
programs are resident, before its own wait. The next kernel does the same, so a chain of small kernels (RoPE,
attention, combine) and the GEMV after them become resident while the kernel ahead of them still runs, and
that GEMV's weight loads (step 1) overlap the whole chain instead of the last kernel's tail. Still correct:
each kernel waits for the one before it to complete, which waited for its own predecessor. No deadlock: a
kernel is let in only when every program of the one before it is resident, so each waiting kernel's
predecessor holds all the SM room it needs. A long-K GEMV launched without PDL (ops.PDL_MAX_K) then still
lets its successor in early (mode 3). QRUN_PDL_EARLY=small does it only for the kernels that are not GEMVs
(RoPE, attention, combine, norm, embedding, argmax): the GEMV after such a chain (o) becomes resident during
the GEMV before it (qkv), and no GEMV's successor is let in before the GEMV's wait. Both are off by default:
on the H100 they decoded Qwen2.5-7B at 436 and 444 tok/s against 460 (round 11, attempt 55: the o GEMV gains
1.3 µs a layer, the attention kernel beside its early loads and the gate+up GEMV after it lose more).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    _HAVE_GDC = True
except ImportError:  # pragma: no cover (older triton)
    _HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EARLY = os.environ.get("QRUN_PDL_EARLY", "0")  # "1": every kernel; "small": all but the GEMVs


@triton.jit
def pdl_enter(MODE: tl.constexpr):
    """Steps 2-3 of the protocol, by the kernel's PDL constexpr (pdl_kwargs): 0 nothing (launched without PDL);
    1 wait, then let the next kernel in; 2 let it in, then wait (QRUN_PDL_EARLY); 3 only let it in (launched
    without PDL, so there is nothing to wait for; pdl_trigger_kwargs)."""
    if MODE == 1:
        gdc_wait()
        gdc_launch_dependents()
    elif MODE == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif MODE == 3:
        gdc_launch_dependents()


@functools.cache
def pdl_enabled(device_index: int) -> bool:
    """True when kernels on this CUDA device should be launched with launch_pdl=True."""
    if INTERPRET or not _HAVE_GDC or os.environ.get("QRUN_PDL", "1") == "0" or device_index < 0:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover
        return False
    if "launch_pdl" not in CUDAOptions.__dataclass_fields__:
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _on(t: torch.Tensor) -> bool:
    return t.is_cuda and pdl_enabled(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_kwargs(t: torch.Tensor, gemv: bool = False) -> dict:
    """Launch keywords for a decode kernel whose tensors live with `t`: {'PDL': mode} for the kernel's
    constexpr (pdl_enter), plus launch_pdl=True when enabled. gemv: the kernel is a GEMV (QRUN_PDL_EARLY=small
    leaves those at mode 1)."""
    early = EARLY == "1" or (EARLY == "small" and not gemv)
    return {"PDL": 2 if early else 1, "launch_pdl": True} if _on(t) else {"PDL": 0}


def pdl_trigger_kwargs(t: torch.Tensor) -> dict:
    """For a kernel launched without PDL although PDL is on (a long-K GEMV): with QRUN_PDL_EARLY it still lets
    its successor in at its start (mode 3); otherwise the successor waits for its programs to exit."""
    return {"PDL": 3} if EARLY == "1" and _on(t) else {"PDL": 0}
