"""Weight layouts the kernels read. "rows" is the canonical qrun/quant.py layout (row-major packed bytes,
scales and zeros (N, NB)). "il4" interleaves int4 rows by 4 at 32-bit-word granularity for the decode GEMV
(gemv_il.py says why): the tensors keep their logical shapes, (N, Kp/2) uint8 and (N, NB), but their memory
holds (N/4, Kp/8, 4) words and (N/4, NB, 4) scales/zeros, i.e. element [4 r + j, c] of the logical shape is
stored at [r, c, j]. Only the kernels (and `deinterleave4`) may read them; the loader makes them for CUDA.
"""
from __future__ import annotations

import torch

LAYOUTS = ("rows", "il4")


def can_interleave4(encoding: str, qweight: torch.Tensor) -> bool:
    """int4 weights whose rows split into groups of 4 and whose packed rows are whole 32-bit words."""
    return (encoding in ("int4_sym", "int4_asym") and qweight.dim() == 2 and qweight.shape[0] % 4 == 0
            and qweight.shape[1] % 4 == 0)


def _il(t: torch.Tensor, elem: int) -> torch.Tensor:
    """(N, C) -> same shape, memory (N/4, C/elem, 4, elem): row groups of 4 interleaved every `elem` columns."""
    n, c = t.shape
    return t.reshape(n // 4, 4, c // elem, elem).permute(0, 2, 1, 3).contiguous().view(n, c)


def _unil(t: torch.Tensor, elem: int) -> torch.Tensor:
    n, c = t.shape
    return t.contiguous().view(n // 4, c // elem, 4, elem).permute(0, 2, 1, 3).reshape(n, c)


def interleave4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None):
    """Canonical int4 parts -> "il4" parts (new tensors, same shapes and dtypes)."""
    return (_il(qweight, 4), _il(scales, 1), None if zeros is None else _il(zeros, 1))


def deinterleave4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None):
    """The inverse of interleave4."""
    return (_unil(qweight, 4), _unil(scales, 1), None if zeros is None else _unil(zeros, 1))
