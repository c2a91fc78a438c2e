"""RMSNorm in one kernel instead of ~8 small ones: y = weight * rmsnorm(x), one program per row.

Numerics follow the reference (qrun/kernels/reference.py rms_norm_ref, as Hugging Face): normalised in
float32, cast to the activation dtype, then multiplied by the weight. In the decode step of small models the
norm runs inside the next GEMV instead (gemv4.py); this kernel serves every other case.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dequant import cast
from .pdl import pdl_enter, pdl_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def rms_norm_kernel(
    # pointers: x, weight, y; rows of D contiguous elements
    x_ptr, w_ptr, y_ptr,
    # sizes
    D, eps,
    # meta
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if PDL:  # pdl.py: nothing above reads what an earlier kernel writes
        pdl_enter(PDL)
    x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    xn = cast(x * inv, y_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    tl.store(y_ptr + row * D + offs, cast(w * xn, y_ptr.dtype.element_ty, INTERPRET), mask=m)


def rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) without the custom-op wrapper (for use inside other ops)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1 or x2.stride(0) != d:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    block = triton.next_power_of_2(d)
    rms_norm_kernel[(x2.shape[0],)](x2, weight, y, d, eps, BLOCK=block, INTERPRET=INTERPRET,
                                   num_warps=4 if block <= 2048 else 8, **pdl_kwargs(x2))
    return y.view(x.shape)


@torch.library.custom_op("qrun::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) -> weight * rmsnorm(x), same shape and dtype."""
    return rms_norm_launch(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)
