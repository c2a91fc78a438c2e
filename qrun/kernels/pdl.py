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
"""
from __future__ import annotations

import functools
import os

import torch
import triton

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


def pdl_kwargs(t: torch.Tensor) -> dict:
    """Launch keywords for a decode kernel whose tensors live with `t`: {'PDL': bool} for the kernel's
    constexpr, plus launch_pdl=True when enabled."""
    on = t.is_cuda and pdl_enabled(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
