"""Plain-torch reference for the quantized linear: dequantize the whole weight, then matmul.

This is the CPU path and the oracle every Triton kernel is tested against. Layouts are those of
qrun/quant.py (the canonical .stcmp layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qrun.quant import dequantize_parts

from .layout import to_rows


def parts_of(qweight, scales, zeros):
    parts = {"qweight": qweight, "scales": scales}
    if zeros is not None:
        parts["zeros"] = zeros
    return parts


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) over the last dim, rounded as Hugging Face's Qwen2/Llama RMSNorm: normalised in
    float32, cast to x.dtype, then scaled by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def quant_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, bias: torch.Tensor | None, encoding: str,
                     block_size: int, in_features: int, norm_weight: torch.Tensor | None = None,
                     eps: float = 0.0, residual: torch.Tensor | None = None, layout: str = "rows") -> torch.Tensor:
    """x (..., K) -> (..., N) in x.dtype; the weight is dequantized in float32 then cast to x.dtype.
    norm_weight: x is first replaced by rms_norm_ref(x, norm_weight, eps); residual (..., N) is added last.
    layout "il4" / "tc16": the parts are first put back in the canonical order (layout.py)."""
    qweight, scales, zeros = to_rows(layout, qweight, scales, zeros)
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    n = scales.shape[0]
    w = dequantize_parts(encoding, parts_of(qweight, scales, zeros), (n, in_features), block_size,
                         dtype=x.dtype)
    y = F.linear(x, w, bias)
    return y if residual is None else residual + y


def quant_linear_silu_mul_ref(x, qweight, scales, zeros, encoding: str, block_size: int,
                              in_features: int, norm_weight: torch.Tensor | None = None,
                              eps: float = 0.0, layout: str = "rows") -> torch.Tensor:
    """Rows [0, N/2) of the weight are the gate, rows [N/2, N) the up projection: silu(x Wg^T) * (x Wu^T)."""
    y = quant_linear_ref(x, qweight, scales, zeros, None, encoding, block_size, in_features, norm_weight, eps,
                         layout=layout)
    g, u = y.chunk(2, dim=-1)
    return F.silu(g) * u
