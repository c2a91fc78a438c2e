"""Plain-torch reference for the quantized linear: dequantize the whole weight, then matmul.

This is the CPU path and the oracle every Triton kernel is tested against. Layouts are those of
qrun/quant.py (the canonical .stcmp layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qrun.quant import dequantize_parts


def parts_of(qweight, scales, zeros):
    parts = {"qweight": qweight, "scales": scales}
    if zeros is not None:
        parts["zeros"] = zeros
    return parts


def quant_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, bias: torch.Tensor | None, encoding: str,
                     block_size: int, in_features: int) -> torch.Tensor:
    """x (..., K) -> (..., N) in x.dtype; the weight is dequantized in float32 then cast to x.dtype."""
    n = scales.shape[0]
    w = dequantize_parts(encoding, parts_of(qweight, scales, zeros), (n, in_features), block_size,
                         dtype=x.dtype)
    return F.linear(x, w, bias)


def quant_linear_silu_mul_ref(x, qweight, scales, zeros, encoding: str, block_size: int,
                              in_features: int) -> torch.Tensor:
    """Rows [0, N/2) of the weight are the gate, rows [N/2, N) the up projection: silu(x Wg^T) * (x Wu^T)."""
    y = quant_linear_ref(x, qweight, scales, zeros, None, encoding, block_size, in_features)
    g, u = y.chunk(2, dim=-1)
    return F.silu(g) * u
