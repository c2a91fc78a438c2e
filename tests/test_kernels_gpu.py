"""The Triton kernels on a CUDA GPU at real layer shapes (run on the device: `pytest -m gpu`).

Fresh random inputs for every case; the output memory is poisoned with NaN before each run (the caching
allocator hands the freed NaN block to the kernel's output), so an unwritten element fails; NaN never
passes. Oracle: the reference weight (dequantized to the activation dtype) times x in float64.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines only with -m gpu
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from qrun.kernels import quant_linear, quant_linear_silu_mul  # noqa: E402
from qrun.kernels.reference import parts_of  # noqa: E402
from qrun.quant import dequantize_parts, quantize  # noqa: E402

DEV = "cuda"


@pytest.fixture(autouse=True, scope="module")
def _no_tuning():
    # Timing every candidate config would compile ~8 variants per case: correctness needs only one.
    import qrun.kernels.ops as ops
    ops.TUNE = False
    yield
    ops.TUNE = True


def _weight(n, k, enc, b):
    # Quantize on the GPU: fast at 7B shapes and the same code as on the CPU.
    qt = quantize(torch.randn(n, k, device=DEV), enc, b)
    return qt.parts["qweight"], qt.parts["scales"], qt.parts.get("zeros")


def _poison(shape, dtype):
    torch.full(shape, float("nan"), dtype=dtype, device=DEV)  # freed at once, reused for the output


def _check(y, ref, tol=1e-2, what=""):
    assert torch.isfinite(y).all(), f"NaN/Inf in the output (unwritten element?) {what}"
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err <= tol, f"{err} {what}"


def _ref(x, parts, n, k, enc, b, bias=None):
    w = dequantize_parts(enc, parts_of(*parts), (n, k), b, dtype=x.dtype).double()
    return torch.nn.functional.linear(x.double(), w, None if bias is None else bias.double())


SHAPES = [(896, 1152), (4864, 896), (3584, 4608), (18944, 3584), (896, 151936)]


@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("k,n", SHAPES)
def test_int4_sym_real_shapes(k, n, m):
    torch.manual_seed(1000 * m + n)
    parts = _weight(n, k, "int4_sym", 128)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    _poison((m, n), torch.bfloat16)
    y = quant_linear(x, *parts, bias, encoding="int4_sym", block_size=128, in_features=k)
    _check(y, _ref(x, parts, n, k, "int4_sym", 128, bias))


@pytest.mark.parametrize("enc", ["int8_sym", "int4_sym", "int4_asym", "nf4"])
@pytest.mark.parametrize("b", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 5, 128])
def test_every_encoding_and_block(enc, b, m):
    # odd N, K not a multiple of the block (x has K columns, the weight Kp)
    n, k = 1001, 3000
    torch.manual_seed(7 * b + m)
    parts = _weight(n, k, enc, b)
    x = torch.randn(2, m, k, device=DEV, dtype=torch.float16 if b == 64 else torch.bfloat16)
    _poison((2 * m, n), x.dtype)
    y = quant_linear(x, *parts, None, encoding=enc, block_size=b, in_features=k)
    assert y.shape == (2, m, n)
    _check(y, _ref(x, parts, n, k, enc, b))


@pytest.mark.parametrize("m", [1, 4, 200])
@pytest.mark.parametrize("k,n", [(896, 9728), (3584, 37888)])
def test_gate_up_silu_mul(k, n, m):
    torch.manual_seed(m)
    parts = _weight(n, k, "int4_sym", 128)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    _poison((m, n // 2), torch.bfloat16)
    y = quant_linear_silu_mul(x, *parts, encoding="int4_sym", block_size=128, in_features=k)
    g, u = _ref(x, parts, n, k, "int4_sym", 128).chunk(2, dim=-1)
    _check(y, torch.nn.functional.silu(g) * u)


def test_cuda_graph_capture_and_compile():
    k, n = 896, 1152
    parts = _weight(n, k, "int4_sym", 128)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)

    def f(x):
        return quant_linear(x, *parts, None, encoding="int4_sym", block_size=128, in_features=k)

    f(x)  # tunes the launch config outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = f(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    _check(y, _ref(x, parts, n, k, "int4_sym", 128))
    yc = torch.compile(f, fullgraph=True)(x)
    _check(yc, _ref(x, parts, n, k, "int4_sym", 128))


@pytest.mark.parametrize("enc,b,n,k,every", [("int4_sym", 128, 1008, 3072, True),
                                             ("int4_sym", 128, 2 * 504, 3072, True),  # fused silu
                                             ("int4_asym", 32, 37, 203, False),
                                             ("int4_asym", 64, 2 * 501, 4100, False)])
def test_gemv4_configs(enc, b, n, k, every, monkeypatch):
    # The word GEMV's autotune list: every candidate must be right, not only the first (which the other
    # tests use). Ragged N, K not a multiple of 8 or of the block (asym), the fused silu (n = 2 * 504, B = 64).
    import qrun.kernels.ops as ops
    torch.manual_seed(b + n)
    parts = _weight(n, k, enc, b)
    cands = ops._gemv4_candidates(b, -(-k // b))
    for cfg in cands if every else cands[:2]:
        monkeypatch.setattr(ops, "_gemv4_candidates", lambda *a, c=cfg: [c])
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        _poison((1, n), torch.bfloat16)
        if every and n == 2 * 504 or b == 64:
            y = quant_linear_silu_mul(x, *parts, encoding=enc, block_size=b, in_features=k)
            g, u = _ref(x, parts, n, k, enc, b).chunk(2, dim=-1)
            _check(y, torch.nn.functional.silu(g) * u)
        else:
            y = quant_linear(x, *parts, None, encoding=enc, block_size=b, in_features=k)
            _check(y, _ref(x, parts, n, k, enc, b))
        monkeypatch.undo()


@pytest.mark.parametrize("enc", ["int4_asym", "int4_sym", "int8_sym"])
@pytest.mark.parametrize("k,n", [(896, 1152), (3584, 4608), (4864, 896)])
def test_fused_norm_and_residual(enc, k, n):
    # RMSNorm in the GEMV's prologue and the residual add in its epilogue (int4, M = 1; int8 takes the
    # fallback), every candidate config being the same code path; the fused silu variant with the norm.
    import qrun.kernels.ops as ops
    torch.manual_seed(k + n)
    parts = _weight(n, k, enc, 128)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16) * 3
    nw = (torch.rand(k, device=DEV) + 0.5).to(torch.bfloat16)
    res = torch.randn(1, n, device=DEV, dtype=torch.bfloat16)
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    w = dequantize_parts(enc, parts_of(*parts), (n, k), 128, dtype=torch.bfloat16).double()
    for cfg in ops._gemv4_candidates(128, -(-k // 128)):
        ops._tuned.clear()
        orig = ops._gemv4_candidates
        ops._gemv4_candidates = lambda *a, c=cfg: [c]
        try:
            _poison((1, n), torch.bfloat16)
            y = quant_linear(x, *parts, None, encoding=enc, block_size=128, in_features=k, norm_weight=nw, eps=1e-6,
                             residual=res)
            _check(y, xn @ w.T + res.double())
            _poison((1, n // 2), torch.bfloat16)
            y = quant_linear_silu_mul(x, *parts, encoding=enc, block_size=128, in_features=k, norm_weight=nw,
                                      eps=1e-6)
            g, u = (xn @ w.T).chunk(2, dim=-1)
            _check(y, torch.nn.functional.silu(g) * u)
        finally:
            ops._gemv4_candidates = orig
        if enc == "int8_sym":
            break  # one path, no word-GEMV configs


@pytest.mark.parametrize("enc", ["int4_sym", "int4_asym"])
@pytest.mark.parametrize("k,n", [(896, 1152), (4864, 896), (3584, 4608), (18944, 3584), (3584, 37888)])
def test_il4_layout_every_config(enc, k, n):
    # The interleaved layout the loader gives int4 weights on CUDA: every GEMV candidate config with bias, with
    # the fused norm + residual and as the fused gate+up; the GEMM's interleaved addressing at M = 3 and 64.
    import qrun.kernels.ops as ops
    from qrun.kernels.layout import interleave4
    torch.manual_seed(k * 7 + n)
    parts = _weight(n, k, enc, 128)
    il = interleave4(*parts)
    w = dequantize_parts(enc, parts_of(*parts), (n, k), 128, dtype=torch.bfloat16).double()
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16) * 3
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    nw = (torch.rand(k, device=DEV) + 0.5).to(torch.bfloat16)
    res = torch.randn(1, n, device=DEV, dtype=torch.bfloat16)
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    orig = ops._il4_candidates
    try:
        for cfg in orig(-(-k // 128)):
            ops._tuned.clear()
            ops._il4_candidates = lambda *a, c=cfg, **kw: [c]
            _poison((1, n), torch.bfloat16)
            y = quant_linear(x, *il, bias, encoding=enc, block_size=128, in_features=k, layout="il4")
            _check(y, x.double() @ w.T + bias.double())
            _poison((1, n), torch.bfloat16)
            y = quant_linear(x, *il, None, encoding=enc, block_size=128, in_features=k, norm_weight=nw, eps=1e-6,
                             residual=res, layout="il4")
            _check(y, xn @ w.T + res.double())
            _poison((1, n // 2), torch.bfloat16)
            y = quant_linear_silu_mul(x, *il, encoding=enc, block_size=128, in_features=k, norm_weight=nw,
                                      eps=1e-6, layout="il4")
            g, u = (xn @ w.T).chunk(2, dim=-1)
            _check(y, torch.nn.functional.silu(g) * u)
    finally:
        ops._il4_candidates = orig
    for m in (3, 64):
        xm = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        _poison((m, n), torch.bfloat16)
        y = quant_linear(xm, *il, None, encoding=enc, block_size=128, in_features=k, layout="il4")
        _check(y, xm.double() @ w.T)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("enc", ["int4_sym", "int4_asym"])
@pytest.mark.parametrize("k,n", [(3584, 4608), (18944, 3584), (896, 1152), (4864, 896), (3584, 37888), (200, 104)])
def test_mma_gemv_every_config(enc, k, n, dt):
    # The tensor-core GEMV (gemv_mma.py) on il4, every config the launcher offers, twice each: with a bias, with
    # the fused norm + residual, and as the fused gate+up with the norm. (200, 104): K short of a block, and 26 row
    # groups, so the last program's row set is cut short (its loads clamped, its stores masked).
    import qrun.kernels.ops as ops
    from qrun.kernels.layout import interleave4
    if not ops._mma_ok(torch.cuda.current_device(), enc, 128, dt):
        pytest.skip("the tensor-core GEMV needs sm_90 and Gluon")
    torch.manual_seed(k * 3 + n)
    parts = _weight(n, k, enc, 128)
    il = interleave4(*parts)
    w = dequantize_parts(enc, parts_of(*parts), (n, k), 128, dtype=dt).double()
    x = torch.randn(1, k, device=DEV, dtype=dt) * 3
    bias = torch.randn(n, device=DEV, dtype=dt)
    nw = (torch.rand(k, device=DEV) + 0.5).to(dt)
    res = torch.randn(1, n, device=DEV, dtype=dt)
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    # gate+up's product of two sums over K = 18944 reaches ~7e4 at this scale, past fp16's 65504 (an overflow of
    # the reference itself, which round 17 hit): the SiLU case gets a quarter of the norm weight in fp16
    nws = nw if dt == torch.bfloat16 else (nw.double() * 0.25).to(dt)
    xns = xn * (nws.double() / nw.double())
    orig = ops._il4_candidates
    cands = ops._mma_candidates(-(-k // 128))
    assert cands
    if dt == torch.float16:
        cands = cands[:1]
    elif (k, n) not in ((3584, 4608), (18944, 3584)):  # every config at the two 7B shapes; a few elsewhere
        cands = [c for i, c in enumerate(cands) if i == 0 or c in (
            next((d for d in cands if d["SPLIT"] > 1), None), next((d for d in cands if d["AHEAD"] > 1), None))]
    try:
        for cfg in cands:
            ops._il4_candidates = lambda *a, c=cfg, **kw: [c]
            for _ in range(2):
                ops._tuned.clear()
                _poison((1, n), dt)
                y = quant_linear(x, *il, bias, encoding=enc, block_size=128, in_features=k, layout="il4")
                assert ops.LAST["gemv"].name == "gemv_il4_mma_kernel"
                _check(y, x.double() @ w.T + bias.double(), what=f"bias {cfg}")
                _poison((1, n), dt)
                y = quant_linear(x, *il, None, encoding=enc, block_size=128, in_features=k, norm_weight=nw,
                                 eps=1e-6, residual=res, layout="il4")
                _check(y, xn @ w.T + res.double(), what=f"norm+res {cfg}")
                _poison((1, n // 2), dt)
                y = quant_linear_silu_mul(x, *il, encoding=enc, block_size=128, in_features=k, norm_weight=nws,
                                          eps=1e-6, layout="il4")
                g, u = (xns @ w.T).chunk(2, dim=-1)
                _check(y, torch.nn.functional.silu(g) * u, what=f"silu {cfg}")
    finally:
        ops._il4_candidates = orig


@pytest.mark.parametrize("enc", ["int4_sym", "int4_asym"])
def test_chain_tuner_picks_a_candidate_and_leaves_results_right(enc):
    # The tuner times the GEMV configs in a CUDA graph over scrambled weight copies; it must not touch the
    # real weights, must cache one of the candidates, and the call must still be right.
    import qrun.kernels.ops as ops
    from qrun.kernels.layout import interleave4
    k, n = 3584, 4608
    torch.manual_seed(5)
    parts = _weight(n, k, enc, 128)
    il = interleave4(*parts)
    before = [t.clone() for t in il if t is not None]
    w = dequantize_parts(enc, parts_of(*parts), (n, k), 128, dtype=torch.bfloat16).double()
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    ops._tuned.clear()
    ops.TUNE = True
    try:
        _poison((1, n), torch.bfloat16)
        y = quant_linear(x, *il, None, encoding=enc, block_size=128, in_features=k, layout="il4")
    finally:
        ops.TUNE = False
    _check(y, x.double() @ w.T)
    assert ops.LAST["gemv_cfg"] in ops._il4_candidates(-(-k // 128), mma=True)
    assert any(key[1] == "gemv_il4" for key in ops._tuned)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in il if t is not None]))


@pytest.mark.parametrize("enc", ["int4_sym", "int4_asym"])
@pytest.mark.parametrize("k,n", [(896, 896), (4864, 896), (3584, 3584), (18944, 3584), (3584, 4608),
                                 (896, 9728)])
def test_tc16_layout_every_config(enc, k, n):
    # The tensor-core GEMV (its mma fragments rely on the lane each element of a 1-D tensor lands in, which
    # only the GPU shows): every candidate config (split-K ones too), with bias and residual, after the RMSNorm
    # kernel, as the fused gate+up, in fp16; the GEMM's tc16 addressing at M = 3 and 64.
    import qrun.kernels.ops as ops
    from qrun.kernels.layout import to_tc16
    torch.manual_seed(k * 5 + n)
    parts = _weight(n, k, enc, 128)
    tc = to_tc16(*parts)
    w = dequantize_parts(enc, parts_of(*parts), (n, k), 128, dtype=torch.bfloat16).double()
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16) * 3
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    nw = (torch.rand(k, device=DEV) + 0.5).to(torch.bfloat16)
    res = torch.randn(1, n, device=DEV, dtype=torch.bfloat16)
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    orig = ops._tc16_candidates
    try:
        for cfg in orig(every=True):
            ops._tuned.clear()
            ops._tc16_candidates = lambda *a, c=cfg, **kw: [c]
            _poison((1, n), torch.bfloat16)
            y = quant_linear(x, *tc, bias, encoding=enc, block_size=128, in_features=k, layout="tc16")
            assert ops.LAST["gemv"].name == "gemv_tc16_kernel"
            _check(y, x.double() @ w.T + bias.double())
            _poison((1, n), torch.bfloat16)
            y = quant_linear(x, *tc, None, encoding=enc, block_size=128, in_features=k, norm_weight=nw, eps=1e-6,
                             residual=res, layout="tc16")
            _check(y, xn @ w.T + res.double())
            _poison((1, n // 2), torch.bfloat16)
            y = quant_linear_silu_mul(x, *tc, encoding=enc, block_size=128, in_features=k, layout="tc16")
            g, u = (x.double() @ w.T).chunk(2, dim=-1)
            _check(y, torch.nn.functional.silu(g) * u)
            xh = x.to(torch.float16)
            wh = dequantize_parts(enc, parts_of(*parts), (n, k), 128, dtype=torch.float16).double()
            _poison((1, n), torch.float16)
            y = quant_linear(xh, *tc, None, encoding=enc, block_size=128, in_features=k, layout="tc16")
            _check(y, xh.double() @ wh.T)
    finally:
        ops._tc16_candidates = orig
    # the split-K configs' arrival counters are back at zero for the next launch
    assert all(int(t.abs().sum()) == 0 for t in ops._counters.values())
    for m in (3, 64):
        xm = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        _poison((m, n), torch.bfloat16)
        y = quant_linear(xm, *tc, None, encoding=enc, block_size=128, in_features=k, layout="tc16")
        _check(y, xm.double() @ w.T)
        _poison((m, n // 2), torch.bfloat16)
        y = quant_linear_silu_mul(xm, *tc, encoding=enc, block_size=128, in_features=k, layout="tc16")
        g, u = (xm.double() @ w.T).chunk(2, dim=-1)
        _check(y, torch.nn.functional.silu(g) * u)


def test_tc16_gate_up_gemm_7b_repeated():
    # Qwen2.5-7B's gate+up (K = 3584, N = 2 x 18944) at M = 64 on tc16, three runs each with every GEMM config:
    # the shape where the fused SILU GEMM gave wrong rows now and then (rel. err 6e-3, 1e7; PERF.md round 6)
    import qrun.kernels.ops as ops
    from qrun.kernels.layout import to_tc16
    torch.manual_seed(7)
    k, n = 3584, 2 * 18944
    parts = _weight(n, k, "int4_sym", 128)
    tc = to_tc16(*parts)
    w = dequantize_parts("int4_sym", parts_of(*parts), (n, k), 128, dtype=torch.bfloat16).double()
    x = torch.randn(64, k, device=DEV, dtype=torch.bfloat16)
    g, u = (x.double() @ w.T).chunk(2, dim=-1)
    ref = torch.nn.functional.silu(g) * u
    orig = ops._gemm_candidates
    try:
        for cfg in orig(64, 128):
            ops._tuned.clear()
            ops._gemm_candidates = lambda *a, c=cfg, **kw: [c]
            for _ in range(3):
                _poison((64, n // 2), torch.bfloat16)
                y = quant_linear_silu_mul(x, *tc, encoding="int4_sym", block_size=128, in_features=k, layout="tc16")
                _check(y, ref, tol=4e-3)  # right: ~1.7e-3 fused, ~2.7e-3 over the bf16 halves; the fault: 6e-3
    finally:
        ops._gemm_candidates = orig


@pytest.mark.parametrize("enc", ["int4_sym", "int4_asym"])
@pytest.mark.parametrize("m,k,n,silu,bias,dt,b", [
    (1024, 3584, 3584, False, False, torch.bfloat16, 128),  # Qwen2.5-7B o at prefill: whole tiles (EVEN)
    (300, 896, 1152, False, True, torch.bfloat16, 64),      # Qwen2-0.5B qkv with its bias; M not whole tiles
    (200, 896, 2 * 4864, True, False, torch.bfloat16, 128),  # 0.5B gate+up, SILU epilogue
    (1024, 896, 2 * 4864, True, False, torch.bfloat16, 128),  # 304 tiles: the 40 after two waves split 3 ways
    (130, 4864, 200, False, False, torch.float16, 256),     # N not whole tiles, fp16, blocks of 256
])
def test_gluon_gemm_every_config(enc, m, k, n, silu, bias, dt, b):
    # The Gluon GEMM (gemm_wg.py: both operands through shared memory, explicit wgmma waits) in every config
    # the launcher offers, twice each, against float64; poisoned output, so an unwritten tile fails.
    import qrun.kernels.ops as ops
    from qrun.kernels.layout import interleave4
    torch.manual_seed(m + n)
    parts = _weight(n, k, enc, b)
    x = torch.randn(m, k, device=DEV, dtype=dt)
    bvec = torch.randn(n, device=DEV, dtype=dt) if bias else None
    ref = _ref(x, parts, n, k, enc, b, bvec)
    if silu:
        g, u = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(g) * u
    il = interleave4(*parts)
    cfgs = [c for c in ops._gemm_candidates(m, b, "il4") if c.get("WG") and ops.wg_config_ok(c, silu)]
    assert cfgs, "no Gluon GEMM config offered"
    assert any(c.get("WS") for c in cfgs) or not ops.GEMM_WS, "no warp-specialized config offered"
    orig = ops._gemm_candidates
    bad = []
    try:
        for cfg in cfgs:
            ops._tuned.clear()
            ops._gemm_candidates = lambda *a, c=cfg, **kw: [c]
            for _ in range(2):
                _poison((m, n // 2 if silu else n), dt)
                if silu:
                    y = quant_linear_silu_mul(x, *il, encoding=enc, block_size=b, in_features=k, layout="il4")
                else:
                    y = quant_linear(x, *il, bvec, encoding=enc, block_size=b, in_features=k, layout="il4")
                assert ops.LAST["gemm_cfg"].get("WG"), "the launcher did not take the Gluon GEMM"
                try:
                    _check(y, ref, tol=4e-3, what=str(cfg))
                except AssertionError as e:
                    bad.append(str(e))
    finally:
        ops._gemm_candidates = orig
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layout", ["il4", "tc16"])
def test_prefill_gemm_every_config(layout, monkeypatch):
    # M = 1024 (prefill), Qwen2.5-7B's o shape (whole tiles: the GEMM's EVEN path, no load masks), each GEMM
    # config ops may pick for the layout, twice: round 7 made the il4 and tc16 GEMMs read tiles in memory order
    # and permute them in registers, and two tc16 configs came out wrong at this M (ops.TC16_BAD_GEMM leaves
    # them out)
    import qrun.kernels.ops as ops
    from qrun.kernels.layout import to_layout
    torch.manual_seed(13)
    k, n, m = 3584, 3584, 1024
    parts = _weight(n, k, "int4_asym", 128)
    w = dequantize_parts("int4_asym", parts_of(*parts), (n, k), 128, dtype=torch.bfloat16).double()
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ w.T
    lp = to_layout(layout, *parts)
    monkeypatch.setattr(ops, "GEMM_EVEN", True)  # the default, set here so that QRUN_GEMM_EVEN=0 cannot skip it
    orig = ops._gemm_candidates
    bad = []  # every wrong config, not only the first
    try:
        for cfg in orig(m, 128, layout):
            ops._tuned.clear()
            ops._gemm_candidates = lambda *a, c=cfg, **kw: [c]
            for _ in range(2):
                _poison((m, n), torch.bfloat16)
                y = quant_linear(x, *lp, None, encoding="int4_asym", block_size=128, in_features=k, layout=layout)
                try:
                    _check(y, ref, tol=4e-3, what=str(cfg))
                except AssertionError as e:
                    bad.append(str(e))
                assert ops.LAST["gemm_even"]  # whole tiles: the kernel ran without load masks
    finally:
        ops._gemm_candidates = orig
    assert not bad, "\n".join(bad)


def test_tc16_short_k_tail():
    # K < Kp (K = 1000, Kp = 1024) and block 64: x is masked past K inside the tensor-core GEMV
    from qrun.kernels.layout import to_tc16
    torch.manual_seed(11)
    k, n = 1000, 256
    parts = _weight(n, k, "int4_asym", 64)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    _poison((1, n), torch.bfloat16)
    y = quant_linear(x, *to_tc16(*parts), None, encoding="int4_asym", block_size=64, in_features=k, layout="tc16")
    _check(y, _ref(x, parts, n, k, "int4_asym", 64))


@pytest.mark.parametrize("enc", ["int8_sym", "int4_sym", "int4_asym", "nf4"])
def test_quant_embedding_real_table(enc):
    # The decode step's embedding lookup at Qwen2.5-7B's table size: bit-identical to dequantize_parts of the
    # gathered rows (the CPU path), for ids anywhere in the table, repeated ones included.
    from qrun.kernels import quant_embedding
    qt = quantize(torch.randn(152064, 3584, device=DEV), enc, 128)
    p = qt.parts
    ids = torch.tensor([0, 152063, 77777, 5, 77777], device=DEV)
    for dt in (torch.bfloat16, torch.float16):
        _poison((ids.numel(), 3584), dt)
        y = quant_embedding(ids, p["qweight"], p["scales"], p.get("zeros"), enc, 128, 3584, dt)
        ref = dequantize_parts(enc, {k: v[ids] for k, v in p.items()}, (ids.numel(), 3584), 128, dt)
        assert torch.equal(y, ref)


@pytest.mark.parametrize("b", [1, 3])
def test_argmax_advance_real_vocab(b):
    # The greedy step's argmax at a 152k vocabulary, called repeatedly on the same scratch: ids equal
    # torch.argmax (the first index on ties, also between the kernel's slices), the position advances by one a
    # call, and ids is written in place.
    from qrun.kernels import argmax_advance
    ids = torch.full((b, 1), -1, dtype=torch.long, device=DEV)
    pos = torch.tensor([100], device=DEV)
    for call in range(6):
        logits = torch.randn(b, 152064, device=DEV) * 4
        if call == 1:
            logits[:, 150000] = logits[:, 3] = 1e4  # a tie across slices: 3 wins
        if call == 2:
            logits[:, 4097] = logits[:, 4096] = 1e4  # a tie inside a slice
        if call == 3:
            logits = -logits.abs() - 1.0  # every logit negative
        argmax_advance(logits, ids, pos)
        torch.cuda.synchronize()
        assert torch.equal(ids.view(-1), logits.argmax(-1)), call
        assert int(pos) == 101 + call
