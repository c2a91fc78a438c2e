"""RMSNorm, optionally fused with the residual add before it: one kernel instead of ~8 small ones.

    y = weight * rmsnorm(x [+ residual])        (and h = x + residual, the new residual stream)

Numerics follow the reference module (qrun/models/llama.py RMSNorm and Hugging Face): the sum is rounded to
the activation dtype first, normalised in float32, cast back, then multiplied by the weight.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dequant import cast
from .pdl import gdc_launch_dependents, gdc_wait, pdl_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def rms_norm_kernel(
    # pointers: x, residual (or dummy), weight, y, h (or dummy); rows of D contiguous elements
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr,
    # sizes
    D, eps,
    # meta
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if PDL:  # pdl.py: nothing above reads what an earlier kernel writes
        gdc_wait()
        gdc_launch_dependents()
    x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        h = cast(x + tl.load(r_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32),
                 h_ptr.dtype.element_ty, INTERPRET)
        tl.store(h_ptr + row * D + offs, h, mask=m)
        x = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    xn = cast(x * inv, y_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    tl.store(y_ptr + row * D + offs, cast(w * xn, y_ptr.dtype.element_ty, INTERPRET), mask=m)


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1 or x2.stride(0) != d:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else y
    r = residual.reshape(-1, d).contiguous() if residual is not None else x2
    block = triton.next_power_of_2(d)
    rms_norm_kernel[(x2.shape[0],)](x2, r, weight, y, h, d, eps, HAS_RES=residual is not None, BLOCK=block,
                                   INTERPRET=INTERPRET, num_warps=4 if block <= 2048 else 8,
                                   **pdl_kwargs(x2))
    return y.view(x.shape), h.view(x.shape)


def rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) without the custom-op wrapper (for use inside other ops)."""
    return _launch(x, weight, eps, None)[0]


@torch.library.custom_op("qrun::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) -> weight * rmsnorm(x), same shape and dtype."""
    return _launch(x, weight, eps, None)[0]


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("qrun::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual) -> (weight * rmsnorm(x + residual), x + residual), both shaped like x."""
    return _launch(x, weight, eps, residual)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)
