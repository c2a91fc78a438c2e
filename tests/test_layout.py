"""The "il4" weight layout (qrun/kernels/layout.py) on the CPU: its definition, its inverse, and that the
reference path reads it as the canonical layout."""
from __future__ import annotations

import torch

from qrun.kernels import quant_linear, quant_linear_silu_mul
from qrun.kernels.layout import can_interleave4, deinterleave4, interleave4
from qrun.quant import quantize


def test_interleave4_definition_and_inverse():
    torch.manual_seed(0)
    qt = quantize(torch.randn(12, 96), "int4_asym", 32)
    q, s, z = qt.parts["qweight"], qt.parts["scales"], qt.parts["zeros"]
    iq, is_, iz = interleave4(q, s, z)
    assert iq.shape == q.shape and iq.dtype == q.dtype and is_.shape == s.shape and iz.shape == z.shape
    words = iq.view(torch.int32).view(3, 12, 4)          # (N/4, KW, 4): [r, kw, j] = word kw of row 4 r + j
    canon = q.view(torch.int32)                          # (N, KW)
    for r in range(3):
        for j in range(4):
            assert torch.equal(words[r, :, j], canon[4 * r + j])
    assert torch.equal(is_.view(3, 3, 4)[1, 2], s[4:8, 2])
    back = deinterleave4(iq, is_, iz)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, s, z)))
    assert deinterleave4(*interleave4(q, s, None))[2] is None


def test_can_interleave4():
    q = quantize(torch.randn(12, 64), "int4_sym", 32).parts["qweight"]
    assert can_interleave4("int4_sym", q) and can_interleave4("int4_asym", q)
    assert not can_interleave4("int8_sym", q)
    assert not can_interleave4("int4_sym", quantize(torch.randn(10, 64), "int4_sym", 32).parts["qweight"])


def test_reference_reads_il4_like_rows():
    torch.manual_seed(1)
    qt = quantize(torch.randn(16, 200), "int4_sym", 64)
    p = (qt.parts["qweight"], qt.parts["scales"], None)
    x = torch.randn(2, 200)
    a = quant_linear(x, *p, None, encoding="int4_sym", block_size=64, in_features=200)
    b = quant_linear(x, *interleave4(*p), None, encoding="int4_sym", block_size=64, in_features=200, layout="il4")
    assert torch.equal(a, b)
    a = quant_linear_silu_mul(x, *p, encoding="int4_sym", block_size=64, in_features=200)
    b = quant_linear_silu_mul(x, *interleave4(*p), encoding="int4_sym", block_size=64, in_features=200,
                              layout="il4")
    assert torch.equal(a, b)
