"""Block-wise quantization: seeds' worked examples as test vectors, error bounds, packing properties."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from qrun.quant import (NF4_CODE, QuantError, bits_per_param, dequantize, effective_scales, pack_int4,
                        quantize, unpack_int4)


def codes(qt):
    qw = qt.parts["qweight"]
    if qt.encoding == "int8_sym":
        return qw
    return unpack_int4(qw, signed=qt.encoding == "int4_sym")


# ------------------------------------------------------------------------------------ seed vectors

def test_seed000_int4_example():
    # seed 000 §4: block [0.0234, -0.0156, 0.0312, -0.0078], scale 0.0312/7, q = [5, -4, 7, -2]
    qt = quantize(torch.tensor([[0.0234, -0.0156, 0.0312, -0.0078]]), "int4_sym", 32, torch.float32)
    assert qt.parts["scales"].item() == pytest.approx(0.0312 / 7, rel=1e-6)
    q = codes(qt)[0, :4]
    assert q.tolist() == [5, -4, 7, -2]
    # seed 000 packs the first value HIGH: 0x5C, 0x7E
    assert pack_int4(q, first="high").tolist() == [0x5C, 0x7E]
    # qrun stores the first value LOW (seed 002 order): the same pairs are 0xC5, 0xE7
    assert qt.parts["qweight"][0, :2].tolist() == [0xC5, 0xE7]


def test_seed002_byte_example():
    # seed 002: the pair (-3, 6) -> low nibble 1101, high nibble 0110 -> 0x6d; scale 0.05 -> -0.15, 0.30
    b = pack_int4(torch.tensor([-3, 6]))
    assert b.tolist() == [0x6D]
    assert unpack_int4(b).tolist() == [-3, 6]
    assert (unpack_int4(b).float() * 0.05).tolist() == pytest.approx([-0.15, 0.30])


def test_seed002_exercise_vector():
    # seed 002 exercise: [-0.33, -0.10, 0.02, 0.41], symmetric INT4, scale = 0.41/7; first two packed, low first
    qt = quantize(torch.tensor([[-0.33, -0.10, 0.02, 0.41]]), "int4_sym", 32, torch.float32)
    s = 0.41 / 7
    expect = [round(v / s) for v in (-0.33, -0.10, 0.02, 0.41)]
    assert expect == [-6, -2, 0, 7]
    assert codes(qt)[0, :4].tolist() == expect
    assert qt.parts["qweight"][0, 0].item() == 0xEA  # low nibble -6 = 0xA, high nibble -2 = 0xE


def test_seed001_asymmetric_example():
    # seed 001 §6: B = [-0.9, -0.3, 0.2, 0.5, 1.0], s = 1.9/15, z = 7, q = [0, 5, 9, 11, 15]
    qt = quantize(torch.tensor([[-0.9, -0.3, 0.2, 0.5, 1.0]]), "int4_asym", 32, torch.float32)
    s = 1.9 / 15
    assert qt.parts["scales"].item() == pytest.approx(s, rel=1e-6)
    assert qt.parts["zeros"].item() == 7
    assert codes(qt)[0, :5].tolist() == [0, 5, 9, 11, 15]
    # The seed prints 0.32 for the third value; s * (9 - 7) is 0.2533: the seed's arithmetic slipped there.
    assert dequantize(qt)[0].tolist() == pytest.approx([s * (q - 7) for q in (0, 5, 9, 11, 15)], rel=1e-6)


def test_seed002_global_outlier_example():
    # seed 002 §2: per-tensor 4-bit with an outlier kills the small weights; per-block keeps them
    w = torch.tensor([[0.01, 0.02, -0.03, 0.05, 3.0]])
    assert codes(quantize(w, "int4_sym", 32, torch.float32))[0, :5].tolist() == [0, 0, 0, 0, 7]
    w2 = torch.cat([torch.tensor([0.01, 0.02, -0.03, 0.05]).repeat(8), torch.full((32,), 3.0)])[None]
    small = codes(quantize(w2, "int4_sym", 32, torch.float32))[0, :4]
    assert small.tolist() == [1, 3, -4, 7]


def test_double_quant_halves_scale_bytes():
    w = torch.randn(64, 1024)
    a = quantize(w, "int4_sym", 32)
    b = quantize(w, "int4_sym", 32, double_quant=True)
    assert b.parts["scales_q"].dtype == torch.uint8 and b.parts["scales_meta"].numel() == math.ceil(64 * 32 / 256)
    assert bits_per_param(a) == pytest.approx(4 + 16 / 32)
    assert bits_per_param(b) == pytest.approx(4 + 8 / 32 + 32 / (256 * 32))
    # scale codes round up: nothing clips, every element within s/2 of its value
    s = effective_scales(b.parts).repeat_interleave(32, dim=1)
    assert ((dequantize(b) - w).abs() <= s / 2 + 1e-6).all()


# ------------------------------------------------------------------------------------ properties

@pytest.mark.parametrize("enc,qmax", [("int8_sym", 127), ("int4_sym", 7)])
@pytest.mark.parametrize("block", [32, 64, 128, 256])
def test_symmetric_error_bound(enc, qmax, block):
    torch.manual_seed(block)
    w = torch.randn(37, 3 * block + 5) * torch.rand(37, 1) * 3  # ragged K, per-row ranges
    qt = quantize(w, enc, block, torch.float32)
    s = qt.parts["scales"].repeat_interleave(block, dim=1)[:, : w.shape[1]]
    assert ((dequantize(qt) - w).abs() <= s / 2 + 1e-6).all()


def test_asym_error_bound_and_range():
    torch.manual_seed(1)
    w = torch.randn(20, 300) + 0.5
    qt = quantize(w, "int4_asym", 64, torch.float32)
    s = qt.parts["scales"].repeat_interleave(64, dim=1)[:, :300]
    assert ((dequantize(qt) - w).abs() <= s / 2 + 1e-6).all()
    assert int(qt.parts["zeros"].max()) <= 15


def test_nf4_codes_and_error():
    torch.manual_seed(2)
    w = torch.randn(16, 128)
    qt = quantize(w, "nf4", 64, torch.float32)
    code = torch.tensor(NF4_CODE)
    s = qt.parts["scales"].repeat_interleave(64, dim=1)
    x = (w / s)
    nearest = (x[..., None] - code).abs().argmin(-1)
    got = unpack_int4(qt.parts["qweight"], signed=False).long()
    # ties aside, the stored code is the nearest one
    assert (code[got] - x).abs().sub((code[nearest] - x).abs()).abs().max() < 1e-6


@pytest.mark.parametrize("enc", ["int8_sym", "int4_sym", "int4_asym", "nf4"])
def test_zero_blocks_and_padding(enc):
    w = torch.zeros(3, 70)
    w[1, 40:] = torch.linspace(-1, 1, 30)
    qt = quantize(w, enc, 32)
    d = dequantize(qt)
    assert d.shape == (3, 70)
    assert torch.equal(d[0], torch.zeros(70)) and torch.equal(d[2], torch.zeros(70))
    assert torch.equal(d[1, :32], torch.zeros(32))
    assert qt.parts["scales"].shape == (3, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_is_an_error_naming_the_tensor(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(QuantError, match="layers.3.mlp"):
        quantize(w, "int4_sym", 32, name="layers.3.mlp")


def test_bad_options():
    with pytest.raises(QuantError):
        quantize(torch.randn(4, 64), "int4_sym", 48)
    with pytest.raises(QuantError):
        quantize(torch.randn(4, 64), "int3", 32)
    with pytest.raises(QuantError):
        quantize(torch.randn(64), "int4_sym", 32)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), pairs=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       first=st.sampled_from(["low", "high"]))
def test_pack_unpack_roundtrip(rows, pairs, seed, first):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, 2 * pairs), generator=g)
    p = pack_int4(q, first=first)
    assert p.dtype == torch.uint8 and p.shape == (rows, pairs)
    assert torch.equal(unpack_int4(p, first=first).long(), q)
    u = torch.randint(0, 16, (rows, 2 * pairs), generator=g)
    assert torch.equal(unpack_int4(pack_int4(u, first=first), signed=False, first=first).long(), u)
    # low-first and high-first differ exactly by swapping nibbles
    lo, hi = pack_int4(q, first="low").long(), pack_int4(q, first="high").long()
    assert torch.equal(((lo & 0xF) << 4) | (lo >> 4), hi)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 300), block=st.sampled_from([32, 64, 128, 256]),
       enc=st.sampled_from(["int8_sym", "int4_sym", "int4_asym", "nf4"]), seed=st.integers(0, 10**6))
def test_quantize_shapes_and_bound(n, k, block, enc, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qt = quantize(w, enc, block, torch.float32)
    nb = -(-k // block)
    assert qt.parts["scales"].shape == (n, nb)
    d = dequantize(qt)
    assert d.shape == (n, k)
    if enc != "nf4":
        s = qt.parts["scales"].repeat_interleave(block, dim=1)[:, :k]
        assert ((d - w).abs() <= s / 2 + 1e-5).all()
