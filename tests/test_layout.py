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


def test_tc16_definition_and_inverse():
    # word [t, q, j, lane = 4 r + c] holds bytes W[16t+r, k0:k0+2], W[16t+r, k0+2:k0+4], W[16t+r+8, k0:k0+2],
    # W[16t+r+8, k0+2:k0+4] with k0 = 64 q + 16 c + 4 j; scales [t, b, rr] = s[16 t + rr, b]
    from qrun.kernels.layout import can_tc16, from_tc16, to_layout, to_rows, to_tc16
    torch.manual_seed(2)
    qt = quantize(torch.randn(32, 256), "int4_asym", 128)
    q, s, z = qt.parts["qweight"], qt.parts["scales"], qt.parts["zeros"]
    tq, ts, tz = to_tc16(q, s, z)
    assert tq.shape == q.shape and tq.dtype == q.dtype and ts.shape == s.shape and tz.shape == z.shape
    words = tq.view(2, 4, 4, 32, 4)                      # bytes [t, q, j, lane, byte]
    for t, qq, j, r, c in ((0, 0, 0, 0, 0), (1, 2, 3, 5, 2), (1, 3, 1, 7, 3), (0, 1, 2, 3, 1)):
        p0 = (64 * qq + 16 * c + 4 * j) // 2               # byte column of k0 in the canonical layout
        want = [q[16 * t + r, p0], q[16 * t + r, p0 + 1], q[16 * t + r + 8, p0], q[16 * t + r + 8, p0 + 1]]
        assert [int(v) for v in words[t, qq, j, 4 * r + c]] == [int(v) for v in want]
    assert torch.equal(ts.view(2, 2, 16)[1, 1], s[16:32, 1])
    assert torch.equal(tz.view(2, 2, 16)[0, 1], z[0:16, 1])
    back = from_tc16(tq, ts, tz)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, s, z)))
    assert from_tc16(*to_tc16(q, s, None))[2] is None
    for lay in ("rows", "il4", "tc16"):
        assert all(torch.equal(a, b) for a, b in zip(to_rows(lay, *to_layout(lay, q, s, z)), (q, s, z)))
    assert can_tc16("int4_sym", q, 128) and can_tc16("int4_asym", q, 64) and can_tc16("int4_sym", q, 64, 32)
    assert not can_tc16("int4_sym", q, 32)           # blocks must hold whole 64-k quads
    assert not can_tc16("int8_sym", q, 128)
    assert not can_tc16("int4_sym", q[:24], 128)     # 24 rows: not whole 16-row tiles
    assert not can_tc16("int4_sym", q[:16], 128, 32)  # gate+up: 16 rows of each half at least


def test_reference_reads_tc16_like_rows():
    from qrun.kernels.layout import to_tc16
    torch.manual_seed(3)
    qt = quantize(torch.randn(64, 200), "int4_asym", 64)
    p = (qt.parts["qweight"], qt.parts["scales"], qt.parts["zeros"])
    x = torch.randn(2, 200)
    a = quant_linear(x, *p, None, encoding="int4_asym", block_size=64, in_features=200)
    b = quant_linear(x, *to_tc16(*p), None, encoding="int4_asym", block_size=64, in_features=200, layout="tc16")
    assert torch.equal(a, b)
    a = quant_linear_silu_mul(x, *p, encoding="int4_asym", block_size=64, in_features=200)
    b = quant_linear_silu_mul(x, *to_tc16(*p), encoding="int4_asym", block_size=64, in_features=200,
                              layout="tc16")
    assert torch.equal(a, b)
