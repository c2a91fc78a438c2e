"""Data-free clip search and GPTQ: better than absmax/RTN where they claim to be, same stored layout."""
from __future__ import annotations

import os

import pytest
import torch

from qrun.quant import ENCODINGS, dequantize, quantize
from qrun.runtime.calibrate import (_pad_blocks, _ranges, _stored_params, fake_quant, gptq_quantize,
                                    mse_clip_ratio)

INT4 = ("int4_sym", "int4_asym", "nf4")


def heavy_tailed(n, k, seed=0):
    """Gaussian weights with a few large outliers, as trained LLM weights have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    mask = torch.rand(n, k, generator=g) < 0.01
    return torch.where(mask, w * 6, w)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_fake_quant_is_what_quantize_stores(encoding, double_quant):
    """The search and GPTQ reason with fake_quant; it must equal the real quantize -> dequantize."""
    w = heavy_tailed(48, 200)  # ragged: 200 is not a multiple of 64
    ratio = torch.rand(48, 4) * 0.5 + 0.5
    ref = dequantize(quantize(w, encoding, 64, double_quant=double_quant, clip_ratio=ratio))
    blocks = _pad_blocks(w, 64)
    s, z, _ = _stored_params(*_ranges(blocks, ratio, encoding), encoding, torch.float16, double_quant)
    got = fake_quant(blocks, s, z, encoding).reshape(48, -1)[:, :200]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("encoding", INT4)
@pytest.mark.parametrize("block_size", [32, 128])
def test_mse_clip_lowers_reconstruction_error(encoding, block_size):
    w = heavy_tailed(64, 512)
    r = mse_clip_ratio(w, encoding, block_size)
    assert r.shape == (64, 512 // block_size) and bool(((r >= 0.5) & (r <= 1)).all())
    err_absmax = (dequantize(quantize(w, encoding, block_size)) - w).square().sum()
    err_mse = (dequantize(quantize(w, encoding, block_size, clip_ratio=r)) - w).square().sum()
    assert err_mse < 0.97 * err_absmax
    # and never worse block by block (ratio 1.0 is a candidate), up to fp16 rounding of the scale
    per_block = lambda q: (q - w).square().reshape(64, -1, block_size).sum(-1)  # noqa: E731
    assert bool((per_block(dequantize(quantize(w, encoding, block_size, clip_ratio=r)))
                 <= per_block(dequantize(quantize(w, encoding, block_size))) * 1.01 + 1e-9).all())


def test_mse_clip_int8_and_zero_blocks():
    w = torch.zeros(8, 256)
    w[:4] = heavy_tailed(4, 256)
    assert bool((mse_clip_ratio(w, "int8_sym", 128) == 1).all())  # INT8: clipping does not pay
    r = mse_clip_ratio(w, "int4_sym", 128)
    assert bool((r[4:] == 1).all())  # all-zero blocks keep ratio 1 and quantize to exact zeros
    assert bool((dequantize(quantize(w, "int4_sym", 128, clip_ratio=r))[4:] == 0).all())


def correlated_inputs(k, seed=0):
    """Inputs like a transformer's: correlated channels, a few channels with much larger magnitude."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    gain = torch.ones(k)
    gain[torch.randperm(k, generator=g)[:k // 32]] = 8.0

    def sample(m, s):
        return (torch.randn(m, k, generator=torch.Generator().manual_seed(s)) @ mix) * gain
    return sample


@pytest.mark.parametrize("encoding", INT4)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_held_out_inputs(encoding, act_order):
    n, k = 128, 256
    w = heavy_tailed(n, k, seed=1)
    sample = correlated_inputs(k)
    x_cal, x_test = sample(1024, 1), sample(1024, 2)  # calibrate on one draw, measure on another
    qt = gptq_quantize(w, x_cal.T @ x_cal, encoding, 64, act_order=act_order)

    def out_err(wq):
        return (x_test @ (w - wq).T).square().mean()
    rtn = out_err(dequantize(quantize(w, encoding, 64)))
    gptq = out_err(dequantize(qt))
    assert gptq < 0.7 * rtn, (float(gptq), float(rtn))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("act_order,double_quant", [(False, False), (True, False), (False, True)])
def test_gptq_result_has_the_stored_layout(encoding, act_order, double_quant):
    """Same parts, shapes and dtypes as quantize(), so the file and kernels take it unchanged."""
    w = heavy_tailed(40, 200, seed=3)  # ragged K
    x = correlated_inputs(200)(512, 4)
    qt = gptq_quantize(w, x.T @ x, encoding, 64, act_order=act_order, double_quant=double_quant)
    ref = quantize(w, encoding, 64, double_quant=double_quant)
    assert qt.encoding == encoding and qt.shape == (40, 200) and qt.block_size == 64
    assert list(qt.parts) == list(ref.parts)
    for p in ref.parts:
        assert qt.parts[p].shape == ref.parts[p].shape and qt.parts[p].dtype == ref.parts[p].dtype, p


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("act_order,double_quant", [(False, False), (True, False), (False, True)])
def test_gptq_with_uncorrelated_inputs_is_exactly_rtn(encoding, act_order, double_quant):
    """With a diagonal Hessian no error can be moved to other columns, so GPTQ without the clip search must
    store exactly what quantize() stores: this pins the code/scale layout and the undoing of act-order's
    permutation (distinct diagonal entries make the order non-trivial)."""
    w = heavy_tailed(40, 200, seed=5)
    h = torch.diag(torch.rand(200, generator=torch.Generator().manual_seed(6)) + 0.5)
    qt = gptq_quantize(w, h, encoding, 64, act_order=act_order, double_quant=double_quant, clip=False)
    ref = quantize(w, encoding, 64, double_quant=double_quant)
    for p in ref.parts:
        torch.testing.assert_close(qt.parts[p], ref.parts[p], rtol=0, atol=0, msg=p)


def test_gptq_dead_inputs_and_bad_hessian():
    from qrun.quant import QuantError
    w = heavy_tailed(16, 128)
    x = torch.randn(256, 128)
    x[:, :10] = 0  # channels never active: their weights cannot matter, GPTQ zeroes them
    qt = gptq_quantize(w, x.T @ x, "int4_sym", 64)
    assert bool((dequantize(qt)[:, :10] == 0).all())
    with pytest.raises(QuantError, match="do not match"):
        gptq_quantize(w, torch.eye(64), "int4_sym", 64)


# ----------------------------------------------------------------------------------- whole-model calibration

CALIB = ("the quick brown fox jumps over the lazy dog. hello world, this is qrun. numbers 0123456789 and "
         "symbols !?.,;: and ünïcode. ") * 12
HELD = "hello there, lazy fox: the numbers 9876543210 jump over the brown dog while qrun counts symbols ?!"


@pytest.mark.parametrize("data_free,embeddings", [(False, "keep"), (True, "keep"), (False, "int4")])
def test_calibrate_tiny_model_end_to_end(tiny_qwen2_dir, tmp_path, data_free, embeddings):
    """Every linear (and, when asked, the tied embedding table) gets GPTQ; the file loads and runs; its
    logits on held-out tokens are closer to the float model's than plain RTN's. data_free: calibrated on
    random token ids instead of text."""
    import qrun
    from qrun.runtime.calibrate import calibrate
    from qrun.runtime.convert import ConvertOptions, convert, open_source
    src = open_source(tiny_qwen2_dir)
    text = tmp_path / "calib.txt"
    text.write_text(CALIB)
    opts = ConvertOptions(bits=4, block_size=32, scheme="sym", method="gptq", embeddings=embeddings)
    q = calibrate(src, None if data_free else str(text), opts, calib_tokens=512, progress=False, device="cpu",
                  ctx=64)
    expect = [n for n in src.names() if ".layers." in n and n.endswith("proj.weight")]
    if embeddings != "keep":
        expect.append("model.embed_tokens.weight")  # tied: GPTQ'd in its lm_head role
    assert sorted(q) == sorted(expect)
    paths = {}
    rtn = ConvertOptions(bits=4, block_size=32, scheme="sym", method="rtn", embeddings=embeddings)
    for name, (o, pre) in {"f": (ConvertOptions(bits=16), None), "rtn": (rtn, None), "gptq": (opts, q)}.items():
        paths[name] = str(tmp_path / f"{name}.stcmp")
        convert(src, paths[name], o, progress=False, quantized=pre)
    logits = {}
    for name, p in paths.items():
        llm = qrun.load(p, device="cpu", max_seq_len=64, progress=False)
        held = torch.tensor([llm.tokenizer.encode(HELD, add_special_tokens=False)[:64]])
        with torch.no_grad():
            logits[name] = llm.model(held).float()
    err = {n: (logits[n] - logits["f"]).square().mean() for n in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"], err


@pytest.mark.parametrize("content,msg", [("", "empty"), ("short text", "fewer than one window")])
def test_calibrate_bad_text_is_one_line_error(run_cli, tiny_qwen2_dir, tmp_path, content, msg):
    text = tmp_path / "calib.txt"
    text.write_text(content)
    out = tmp_path / "out.stcmp"
    rc, _, err = run_cli("convert", tiny_qwen2_dir, "-o", out, "--calibrate", text, "-q")
    assert rc == 1 and err.startswith("qrun: error:") and msg in err and err.count("\n") == 1
    assert not os.path.exists(out)
    rc, _, err = run_cli("convert", tiny_qwen2_dir, "-o", out, "--calibrate", tmp_path / "none.txt", "-q")
    assert rc == 1 and "no such" in err and not os.path.exists(out)
