"""The Triton kernels on the CPU under TRITON_INTERPRET=1, against the float64 dequant reference.

The interpreter flag must be set before triton is imported, and other test modules import torch/triton
normally, so every kernel case runs in ONE subprocess (this file run as a script); the tests here read
its JSON results. Small shapes: odd N, K not a multiple of 256 (and K < Kp), every block size and encoding,
the GEMV (M = 1) and the GEMM (M > 1), bias, the fused SiLU-mul, the custom op's fake implementation.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

ENCODINGS = ("int8_sym", "int4_sym", "int4_asym", "nf4")
BLOCKS = (32, 64, 128, 256)
TOL = 1e-2  # the bound for bf16 activations


def cases():
    """(name, dict) for every kernel case; shapes chosen so that N is odd and K is not a multiple of B."""
    out = []
    for enc in ENCODINGS:
        for b in BLOCKS:
            for m in (1, 5):  # GEMV, GEMM
                out.append((f"{enc}-B{b}-M{m}", dict(enc=enc, b=b, m=m, n=37, k=200, dtype="bfloat16",
                                                    bias=(b == 64), silu=False)))
    # fused gate+up, other activation dtypes, 3-D x, a K that fills several GEMM tiles
    out.append(("silu-gemv", dict(enc="int4_sym", b=32, m=1, n=2 * 19, k=72, dtype="bfloat16", bias=False,
                                  silu=True)))
    out.append(("silu-gemm", dict(enc="int4_asym", b=64, m=3, n=2 * 19, k=150, dtype="bfloat16", bias=False,
                                  silu=True)))
    out.append(("fp16-gemv", dict(enc="nf4", b=128, m=1, n=21, k=300, dtype="float16", bias=True, silu=False)))
    out.append(("fp32-gemm", dict(enc="int8_sym", b=32, m=2, n=33, k=100, dtype="float32", bias=True,
                                  silu=False)))
    out.append(("3d-x-gemm", dict(enc="int4_sym", b=32, m=(2, 3), n=17, k=96, dtype="bfloat16", bias=False,
                                  silu=False)))
    # RMSNorm of x fused in front and the residual add behind: inside the word GEMV (int4, M = 1), and
    # through the fallbacks (norm kernel first, add after) for the byte GEMV and the GEMM
    for enc, m in (("int4_asym", 1), ("int4_sym", 1), ("int8_sym", 1), ("int4_asym", 3)):
        out.append((f"norm-res-{enc}-M{m}", dict(enc=enc, b=32, m=m, n=37, k=200, dtype="bfloat16", bias=True,
                                                 silu=False, norm=True, res=True)))
    out.append(("norm-silu-gemv", dict(enc="int4_asym", b=64, m=1, n=2 * 19, k=150, dtype="bfloat16",
                                       bias=False, silu=True, norm=True)))
    out.append(("norm-fp32-gemv", dict(enc="int4_sym", b=32, m=1, n=21, k=72, dtype="float32", bias=False,
                                       silu=False, norm=True, res=True)))
    # the "il4" layout (int4 rows interleaved by 4, made by interleave4): its own GEMV at M = 1, the GEMM's
    # interleaved addressing at M > 1; K = 200 leaves a partial last step and a K < Kp tail
    for enc in ("int4_sym", "int4_asym"):
        for b in BLOCKS:
            for m in (1, 3):
                out.append((f"il4-{enc}-B{b}-M{m}", dict(enc=enc, b=b, m=m, n=36, k=200, dtype="bfloat16",
                                                          bias=(b == 64), silu=False, layout="il4")))
    out.append(("il4-norm-res-gemv", dict(enc="int4_asym", b=32, m=1, n=36, k=200, dtype="bfloat16", bias=True,
                                          silu=False, norm=True, res=True, layout="il4")))
    out.append(("il4-norm-silu-gemv", dict(enc="int4_sym", b=64, m=1, n=2 * 20, k=150, dtype="bfloat16",
                                           bias=False, silu=True, norm=True, layout="il4")))
    out.append(("il4-silu-gemm", dict(enc="int4_asym", b=32, m=3, n=2 * 20, k=72, dtype="bfloat16", bias=False,
                                      silu=True, layout="il4")))
    # the GEMM's il4 tiles at the GPU's K tiles (read in memory order, then permuted): 32 rows (n = 36: a
    # partial second tile) x 64 k, 16 x 128 k, and the SILU GEMM's up half starting at row N_OUT
    for tile, b, silu in (("32,64", 64, False), ("16,128", 128, False), ("32,64", 64, True)):
        out.append((f"il4-gemm-tile{tile}{'-silu' * silu}", dict(
            enc="int4_asym", b=b, m=3, n=72 if silu else 36, k=300, dtype="bfloat16", bias=not silu, silu=silu,
            layout="il4", tile=tile)))
    out.append(("il4-fp16-gemv", dict(enc="int4_sym", b=128, m=1, n=24, k=300, dtype="float16", bias=True,
                                      silu=False, layout="il4")))
    # whole tiles along M, N and K (the interpreter's 16 x 16 x 32 GEMM tiles): the GEMM without load masks
    # (EVEN), in every layout, plain, with bias and as the fused gate+up
    for lay, enc, b in (("il4", "int4_asym", 32), ("rows", "int8_sym", 32), ("tc16", "int4_sym", 64),
                        ("il4", "int4_sym", 64)):
        out.append((f"even-{lay}-{enc}", dict(enc=enc, b=b, m=16, n=32, k=128, dtype="bfloat16", bias=True,
                                              silu=False, layout=lay, even=True)))
        out.append((f"even-{lay}-{enc}-silu", dict(enc=enc, b=b, m=32, n=2 * 32, k=128, dtype="bfloat16",
                                                   bias=False, silu=True, layout=lay, even=True)))
    # il4 split-K (SPLIT programs a row group along K, the last to arrive sums the partials and the sums of x^2):
    # K = 200 / 300 at B = 32 is 7 / 10 blocks, so the last program gets fewer steps than the others
    for name, c in (("plain", dict(enc="int4_sym", b=32, n=36, k=200, bias=False, silu=False, split=2)),
                    ("norm-res", dict(enc="int4_asym", b=32, n=36, k=300, bias=True, norm=True, res=True, silu=False,
                                      split=3)),
                    ("norm-silu", dict(enc="int4_sym", b=32, n=2 * 20, k=300, bias=False, norm=True, silu=True,
                                       split=2))):
        out.append((f"il4-split{c['split']}-{name}", dict(c, m=1, dtype="bfloat16", layout="il4")))
    # the "tc16" layout (16-row tiles for the tensor-core GEMV, made by to_tc16): its GEMV at M = 1 (the
    # interpreter runs the tensor-op twin of the mma asm), the GEMM's addressing at M > 1, the GEMM at M = 1 for
    # float32 x; K = 200 / 300: a K < Kp tail and a partial last step of the warps (2 warps, 64 k each)
    for enc in ("int4_sym", "int4_asym"):
        for b in (64, 128, 256):
            for m in (1, 3):
                out.append((f"tc16-{enc}-B{b}-M{m}", dict(enc=enc, b=b, m=m, n=48, k=200, dtype="bfloat16",
                                                           bias=(b == 64), silu=False, layout="tc16")))
    out.append(("tc16-res-gemv", dict(enc="int4_asym", b=64, m=1, n=32, k=300, dtype="bfloat16", bias=True,
                                      silu=False, res=True, layout="tc16")))
    out.append(("tc16-norm-res-gemv", dict(enc="int4_sym", b=128, m=1, n=32, k=200, dtype="bfloat16", bias=False,
                                           silu=False, norm=True, res=True, layout="tc16")))
    out.append(("tc16-silu-gemv", dict(enc="int4_sym", b=64, m=1, n=2 * 32, k=150, dtype="bfloat16", bias=False,
                                       silu=True, layout="tc16")))
    # M > 1 gate+up on tc16: two GEMMs over the halves (3 tiles each), silu * up after (ops.py says why)
    out.append(("tc16-silu-gemm", dict(enc="int4_asym", b=64, m=3, n=2 * 48, k=150, dtype="bfloat16", bias=False,
                                       silu=True, layout="tc16")))
    out.append(("tc16-silu-norm-gemm", dict(enc="int4_sym", b=128, m=2, n=2 * 32, k=200, dtype="bfloat16",
                                            bias=False, silu=True, norm=True, layout="tc16")))
    for enc in ("int4_sym", "int4_asym"):
        out.append((f"tc16-fp16-{enc}-gemv", dict(enc=enc, b=128, m=1, n=16, k=300, dtype="float16", bias=True,
                                                  silu=False, layout="tc16")))
    # split-K (2 programs a tile, the last to arrive sums the partials): plain, with bias + residual, gate+up;
    # K = 300 leaves the second program with fewer quads than the first
    for name, c in (("plain", dict(enc="int4_sym", b=64, n=48, k=300, bias=False, silu=False)),
                    ("bias-res", dict(enc="int4_asym", b=128, n=32, k=300, bias=True, res=True, silu=False)),
                    ("silu", dict(enc="int4_sym", b=64, n=2 * 32, k=520, bias=False, silu=True))):
        out.append((f"tc16-split2-{name}", dict(c, m=1, dtype="bfloat16", layout="tc16", split=2)))
    # the GEMM's tc16 tiles at the GPU's K tiles (whole 512-byte chunks, read contiguously): 32 rows x 64 k,
    # 16 x 128 k (two chunks along K), with a partial last row tile (n = 48 is a tile and a half of 32)
    for tile, b in (("32,64", 64), ("16,128", 128), ("32,128", 256)):
        out.append((f"tc16-gemm-tile{tile}", dict(enc="int4_asym", b=b, m=3, n=48, k=300, dtype="bfloat16",
                                                   bias=True, silu=False, layout="tc16", tile=tile)))
    out.append(("tc16-fp32-gemv", dict(enc="int4_sym", b=64, m=1, n=16, k=128, dtype="float32", bias=False,
                                       silu=False, res=True, layout="tc16")))
    return out


# ------------------------------------------------------------------------------- subprocess (interpreter)

def _run_cases() -> dict:
    import torch

    from qrun.kernels import ops
    from qrun.kernels.layout import to_layout
    from qrun.kernels.ops import quant_linear_silu_mul_triton, quant_linear_triton
    from qrun.kernels.reference import parts_of
    from qrun.quant import dequantize_parts, quantize

    torch.manual_seed(0)
    ops.GEMM_EVEN = True  # the default (QRUN_GEMM_EVEN=0 turns it off); the cases below expect it
    res = {}
    for name, c in cases():
        os.environ["QRUN_TC16_SPLIT"] = os.environ["QRUN_IL4_SPLIT"] = str(c.get("split", 1))  # read per launch
        os.environ["QRUN_GEMM_TILE"] = c.get("tile", "16,32")
        dtype = getattr(torch, c["dtype"])
        qt = quantize(torch.randn(c["n"], c["k"]), c["enc"], c["b"])
        p = qt.parts
        lead = c["m"] if isinstance(c["m"], tuple) else (c["m"],)
        x = torch.randn(*lead, c["k"]).to(dtype)
        bias = torch.randn(c["n"]).to(dtype) if c["bias"] else None
        args = (p["qweight"], p["scales"], p.get("zeros"))
        # Oracle: the reference's weight (dequantized to the activation dtype, as reference.py does) and the
        # same rounded x and bias, multiplied in float64: what is left is the kernel's own error.
        w = dequantize_parts(c["enc"], parts_of(*args), (c["n"], c["k"]), c["b"], dtype=dtype).double()
        nw = torch.rand(c["k"]).add(0.5).to(dtype) if c.get("norm") else None
        layout = c.get("layout", "rows")
        args = to_layout(layout, *args)  # the oracle above read the canonical parts
        xd = x.double()
        if nw is not None:
            xd = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
        ref = torch.nn.functional.linear(xd, w, None if bias is None else bias.double())
        if c["silu"]:
            g, u = ref.chunk(2, dim=-1)
            ref = torch.nn.functional.silu(g) * u
            y = quant_linear_silu_mul_triton(x, *args, c["enc"], c["b"], c["k"], nw, 1e-5, layout)
        else:
            res_in = torch.randn(ref.shape).to(dtype) if c.get("res") else None
            if res_in is not None:
                ref = ref + res_in.double()
            y = quant_linear_triton(x, *args, bias, c["enc"], c["b"], c["k"], nw, 1e-5, res_in, layout)
        ok_shape = tuple(y.shape) == tuple(ref.shape) and y.dtype == dtype
        err = ((y.double() - ref).norm() / ref.norm()).item() if ok_shape else float("inf")
        res[name] = dict(err=err, finite=bool(torch.isfinite(y).all()), shape_ok=ok_shape)
        if lead[-1] > 1 and not isinstance(c["m"], tuple):  # a GEMM: did it run without masks exactly when even?
            res[name]["even_ok"] = ops.LAST.get("gemm_even") == c.get("even", False)

    # The custom op through torch.library's own checks (schema, fake tensor, autograd registration).
    import qrun.kernels.ops  # noqa: F401  (registers qrun::quant_linear)
    qt = quantize(torch.randn(9, 64), "int4_sym", 32)
    x = torch.randn(1, 64).to(torch.bfloat16)
    try:
        torch.library.opcheck(torch.ops.qrun.quant_linear.default,
                              (x, qt.parts["qweight"], qt.parts["scales"], None, None, "int4_sym", 32, 64),
                              test_utils=("test_schema", "test_faketensor"))
        res["opcheck"] = dict(ok=True)
    except Exception as e:  # reported to the parent test
        res["opcheck"] = dict(ok=False, why=f"{type(e).__name__}: {e}")
    return res


@pytest.fixture(scope="module")
def results():
    from interpret import run_interpreted
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", [n for n, _ in cases()])
def test_kernel_matches_reference(results, name):
    r = results[name]
    assert r["shape_ok"] and r["finite"], r
    assert r["err"] <= TOL, r
    assert r.get("even_ok", True), r


def test_custom_op_fake_and_schema(results):
    assert results["opcheck"]["ok"], results["opcheck"]


def test_cpu_tensors_take_the_reference_path():
    import torch

    from qrun.kernels import quant_linear
    from qrun.kernels.reference import quant_linear_ref
    from qrun.quant import quantize

    p = quantize(torch.randn(7, 40), "int4_asym", 32).parts
    x = torch.randn(2, 40)
    y = quant_linear(x, p["qweight"], p["scales"], p["zeros"], None, encoding="int4_asym", block_size=32,
                     in_features=40)
    assert torch.equal(y, quant_linear_ref(x, p["qweight"], p["scales"], p["zeros"], None, "int4_asym", 32, 40))


def test_bad_shapes_are_refused():
    import torch

    from qrun.kernels.ops import quant_linear_triton
    from qrun.quant import quantize

    p = quantize(torch.randn(7, 64), "int4_sym", 32).parts
    with pytest.raises(ValueError, match="features"):
        quant_linear_triton(torch.randn(1, 65), p["qweight"], p["scales"], None, None, "int4_sym", 32, 65)
    with pytest.raises(ValueError, match="qweight shape"):
        quant_linear_triton(torch.randn(1, 64), p["qweight"], p["scales"], None, None, "int8_sym", 32, 64)
    with pytest.raises(ValueError, match="zeros"):
        quant_linear_triton(torch.randn(1, 64), p["qweight"], p["scales"], None, None, "int4_asym", 32, 64)
    with pytest.raises(ValueError, match="tc16"):  # 7 rows are not a 16-row tile; block 32 is under a quad
        quant_linear_triton(torch.randn(1, 64), p["qweight"], p["scales"], None, None, "int4_sym", 32, 64,
                            layout="tc16")
    with pytest.raises(ValueError, match="layout"):
        quant_linear_triton(torch.randn(1, 64), p["qweight"], p["scales"], None, None, "int4_sym", 32, 64,
                            layout="tiles")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (sets TRITON_INTERPRET=1)"
    sys.path.insert(0, os.getcwd())
    print(json.dumps(_run_cases()))
