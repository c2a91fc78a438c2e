"""Weight layouts the kernels read. "rows" is the canonical qrun/quant.py layout (row-major packed bytes,
scales and zeros (N, NB)). "il4" interleaves int4 rows by 4 at 32-bit-word granularity for the decode GEMV
(gemv_il.py says why): the tensors keep their logical shapes, (N, Kp/2) uint8 and (N, NB), but their memory
holds (N/4, Kp/8, 4) words and (N/4, NB, 4) scales/zeros, i.e. element [4 r + j, c] of the logical shape is
stored at [r, c, j]. Only the kernels (and `deinterleave4`) may read them; the loader makes them for CUDA.

"tc16" feeds the tensor-core decode GEMV (gemv_tc.py), which hands each word straight to an mma.m16n8k16 as a
lane's A fragment. Rows go in tiles of 16 (n = 16 t + 8 h + r) and K in quads of 64 k; within a quad, lane
(r, c) of chunk j covers k0 = 64 q + 16 c + 4 j .. k0 + 3. Memory: words (N/16, Kp/64, 4 [j], 32 [lane = 4 r + c])
int32, each word 4 bytes [W[r, k0:k0+2], W[r, k0+2:k0+4], W[r+8, k0:k0+2], W[r+8, k0+2:k0+4]] (bytes as in
the canonical layout: two k of one row, low nibble first, so the GEMM reads tc16 through address arithmetic
alone); scales and zeros (N/16, NB, 16). Logical shapes stay (N, Kp/2) and (N, NB).
"""
from __future__ import annotations

import torch

LAYOUTS = ("rows", "il4", "tc16")


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


def can_tc16(encoding: str, qweight: torch.Tensor, block_size: int, row_tile: int = 16) -> bool:
    """int4 weights in row tiles of 16 (row_tile 32 for gate+up: 16 rows of each half) and quant blocks of whole
    64-k quads."""
    return (encoding in ("int4_sym", "int4_asym") and qweight.dim() == 2 and qweight.shape[0] % row_tile == 0
            and block_size % 64 == 0 and qweight.shape[1] % 32 == 0)


def to_tc16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None):
    """Canonical int4 parts -> "tc16" parts (new tensors, same shapes and dtypes)."""
    n, kb = qweight.shape  # kb = Kp / 2 bytes; byte p = 32 q + 8 c + 2 j + kp holds k = 2 p, 2 p + 1
    w = qweight.reshape(n // 16, 2, 8, kb // 32, 4, 4, 2)        # [t, h, r, q, c, j, kp]
    w = w.permute(0, 3, 5, 2, 4, 1, 6).contiguous().view(n, kb)  # [t, q, j, r, c, h, kp]

    def sc(a):
        return a.reshape(n // 16, 16, a.shape[1]).transpose(1, 2).contiguous().view(a.shape)
    return w, sc(scales), None if zeros is None else sc(zeros)


def from_tc16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None):
    """The inverse of to_tc16."""
    n, kb = qweight.shape
    w = qweight.contiguous().view(n // 16, kb // 32, 4, 8, 4, 2, 2)  # [t, q, j, r, c, h, kp]
    w = w.permute(0, 5, 3, 1, 4, 2, 6).reshape(n, kb)                # [t, h, r, q, c, j, kp]

    def sc(a):
        return a.contiguous().view(n // 16, a.shape[1], 16).transpose(1, 2).reshape(a.shape)
    return w, sc(scales), None if zeros is None else sc(zeros)


def to_layout(layout: str, qweight, scales, zeros):
    """Canonical parts -> parts in `layout`."""
    return {"rows": lambda *p: p, "il4": interleave4, "tc16": to_tc16}[layout](qweight, scales, zeros)


def to_rows(layout: str, qweight, scales, zeros):
    """Parts in `layout` -> canonical parts."""
    return {"rows": lambda *p: p, "il4": deinterleave4, "tc16": from_tc16}[layout](qweight, scales, zeros)
