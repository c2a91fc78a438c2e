"""The fused decode-step kernels (RMSNorm(+residual), RoPE + KV-cache write, decode attention, the quantized
embedding lookup, the greedy step's argmax + advance) on the CPU under TRITON_INTERPRET=1, against the model's
plain-torch code. One subprocess, because the interpreter flag must be set before triton is imported."""
from __future__ import annotations

import json
import os
import sys

import pytest


def _run() -> dict:
    import torch
    import torch.nn.functional as F

    from qrun.kernels.decode_attention import decode_attention, rope_attention
    from qrun.kernels.rmsnorm import rms_norm
    from qrun.kernels.rope_cache import rope_kv_write
    from qrun.models.llama import RMSNorm, apply_rope

    torch.manual_seed(0)
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 1, 72).to(dt)
        n = RMSNorm(72, 1e-6)
        n.weight = torch.randn(72).to(dt)
        res[f"norm-{dt}"] = (rms_norm(x, n.weight, 1e-6).float() - n(x).float()).abs().max().item()
    b, hq, kv, s, hd = 2, 6, 2, 100, 16
    qkv = torch.randn(b, 1, (hq + 2 * kv) * hd)
    freqs = torch.outer(torch.arange(s).float(), 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    kc, vc = torch.full((b, kv, s, hd), 7.0), torch.full((b, kv, s, hd), 7.0)
    pos = torch.tensor([37])
    q = rope_kv_write(qkv, cos, sin, pos, kc, vc, hq)
    qr, kr, vr = qkv.split([hq * hd, kv * hd, kv * hd], -1)
    qref = apply_rope(qr.view(b, 1, hq, hd).transpose(1, 2), cos[pos], sin[pos])[:, :, 0]
    kref = apply_rope(kr.view(b, 1, kv, hd).transpose(1, 2), cos[pos], sin[pos])[:, :, 0]
    res["rope-q"] = (q - qref).abs().max().item()
    res["rope-k"] = (kc[:, :, 37] - kref).abs().max().item()
    res["rope-v"] = (vc[:, :, 37] - vr.view(b, kv, hd)).abs().max().item()
    kc[:, :, 37] = 7.0
    vc[:, :, 37] = 7.0
    res["rope-untouched"] = float(((kc != 7.0).sum() + (vc != 7.0).sum()).item())
    for s, p in ((100, 37), (700, 650), (700, 0), (1000, 999)):
        kc, vc, q = torch.randn(b, kv, s, hd), torch.randn(b, kv, s, hd), torch.randn(b, hq, hd)
        kc[:, :, p + 1:] = float("nan")  # positions past the token must never be read
        vc[:, :, p + 1:] = float("nan")
        y = decode_attention(q, kc, vc, torch.tensor([p]))
        ref = F.scaled_dot_product_attention(q[:, :, None], kc[:, :, :p + 1].repeat_interleave(hq // kv, 1),
                                             vc[:, :, :p + 1].repeat_interleave(hq // kv, 1))
        res[f"attn-{s}-{p}"] = (y - ref.reshape(b, hq * hd)).abs().max().item()
    # RoPE + cache write + attention + combine in one kernel, against the model's plain-torch steps; the
    # counters must come back to zero (the next step reuses them), positions past the token stay unread and
    # unwritten (NaN), and a second call (the next step) must be right too
    for s, p in ((100, 37), (700, 650), (700, 0), (1000, 999)):
        freqs = torch.outer(torch.arange(s).float(), 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)))
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
        kc, vc = torch.randn(b, kv, s, hd), torch.randn(b, kv, s, hd)
        kc[:, :, p:] = float("nan")
        vc[:, :, p:] = float("nan")
        cnt = torch.zeros(b * kv, dtype=torch.int32)
        worst, ok = 0.0, True
        for step in range(2):
            pp = min(p + step, s - 1)
            qkv = torch.randn(b, 1, (hq + 2 * kv) * hd)
            y = rope_attention(qkv, cos, sin, torch.tensor([pp]), kc, vc, cnt, hq)
            qr, kr, vr = qkv.split([hq * hd, kv * hd, kv * hd], -1)
            qref = apply_rope(qr.view(b, 1, hq, hd).transpose(1, 2), cos[[pp]], sin[[pp]])
            kref = apply_rope(kr.view(b, 1, kv, hd).transpose(1, 2), cos[[pp]], sin[[pp]])[:, :, 0]
            ok &= bool(torch.allclose(kc[:, :, pp], kref, atol=1e-5) and torch.equal(vc[:, :, pp], vr.view(b, kv, hd)))
            ok &= bool(torch.isnan(kc[:, :, pp + 1:]).all() and torch.isnan(vc[:, :, pp + 1:]).all())
            ok &= bool((cnt == 0).all())
            ref = F.scaled_dot_product_attention(qref, kc[:, :, :pp + 1].repeat_interleave(hq // kv, 1),
                                                 vc[:, :, :pp + 1].repeat_interleave(hq // kv, 1))
            worst = max(worst, (y - ref.reshape(b, hq * hd)).abs().max().item())
        res[f"rope-attn-{s}-{p}"] = dict(err=worst, ok=ok)
    x = torch.randn(2, 1, (hq + 2 * kv) * hd).to(torch.bfloat16)  # bf16: the same roundings as the unfused pair
    kc, vc = torch.randn(2, kv, 300, hd).to(torch.bfloat16), torch.randn(2, kv, 300, hd).to(torch.bfloat16)
    kc2, vc2 = kc.clone(), vc.clone()
    freqs = torch.outer(torch.arange(300).float(), 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)))
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    y1 = rope_attention(x, cos, sin, torch.tensor([200]), kc, vc, torch.zeros(2 * kv, dtype=torch.int32), hq)
    q = rope_kv_write(x, cos, sin, torch.tensor([200]), kc2, vc2, hq)
    y2 = decode_attention(q, kc2, vc2, torch.tensor([200]))
    res["rope-attn-bf16"] = dict(err=(y1.float() - y2.float()).abs().max().item(), ok=bool(torch.equal(kc, kc2)
                                                                                          and torch.equal(vc, vc2)))
    # QRUN_FUSED_ATTN=2: RoPE, cache write and attention in one kernel, the slices combined by combine_kernel;
    # the counters are not used and stay zero
    kc3, vc3, cnt = kc2.clone(), vc2.clone(), torch.zeros(2 * kv, dtype=torch.int32)
    kc3[:, :, 200] = 0
    vc3[:, :, 200] = 0
    y3 = rope_attention(x, cos, sin, torch.tensor([200]), kc3, vc3, cnt, hq, False)
    res["rope-attn-bf16-kernel-combine"] = dict(
        err=(y3.float() - y2.float()).abs().max().item(),
        ok=bool(torch.equal(kc3, kc2) and torch.equal(vc3, vc2) and (cnt == 0).all()))
    res.update(_embedding_cases())
    res.update(_argmax_cases())
    res.update(_rope_qkv_cases())
    return res


def _embedding_cases() -> dict:
    """quant_embedding against dequantize_parts of the gathered rows: bit-identical, every encoding and
    activation dtype, a dim that is not a multiple of the quant block (padded table) nor of the kernel's
    block, repeated ids."""
    import torch

    from qrun.kernels.embedding import quant_embedding
    from qrun.quant import dequantize_parts, quantize

    res = {}
    torch.manual_seed(1)
    for enc in ("int8_sym", "int4_sym", "int4_asym", "nf4"):
        for bs, dim in ((32, 200), (128, 72)):
            qt = quantize(torch.randn(50, dim) * 2, enc, bs)
            p = qt.parts
            ids = torch.tensor([3, 49, 0, 3, 17])
            for dt in (torch.bfloat16, torch.float16, torch.float32):
                ref = dequantize_parts(enc, {k: v[ids] for k, v in p.items()}, (ids.numel(), dim), bs, dt)
                y = quant_embedding(ids, p["qweight"], p["scales"], p.get("zeros"), enc, bs, dim, dt)
                res[f"emb-{enc}-{bs}-{dim}-{dt}"] = bool(y.dtype == dt and y.shape == ref.shape
                                                         and torch.equal(y, ref))
    return res


def _rope_qkv_cases() -> dict:
    """The qkv GEMV with RoPE and the cache write in its epilogue (QRUN_ROPE_QKV) against the two-kernel path it
    replaces, quant_linear then rope_kv_write, for int4 sym and asym, with and without bias and the fused norm,
    unsplit and split along K; positions other than the token's stay untouched."""
    import torch

    from qrun.kernels import ops
    from qrun.kernels.layout import to_layout
    from qrun.kernels.rope_cache import rope_kv_write
    from qrun.quant import quantize

    torch.manual_seed(3)
    res = {}
    hq, kv, s, hd, k, bs = 4, 2, 40, 16, 96, 32
    n = (hq + 2 * kv) * hd
    freqs = torch.outer(torch.arange(s).float(), 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)))
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    pos = torch.tensor([23])
    for enc in ("int4_sym", "int4_asym"):
        qt = quantize(torch.randn(n, k), enc, bs)
        parts = to_layout("il4", qt.parts["qweight"], qt.parts["scales"], qt.parts.get("zeros"))
        for extra in (False, True):
            bias = torch.randn(n) if extra else None
            nw = torch.randn(k) if extra else None
            for split in ("1", "2"):
                os.environ["QRUN_IL4_SPLIT"] = split
                ops._tuned.clear()
                x = torch.randn(1, 1, k)
                kc, vc = torch.full((1, kv, s, hd), 7.0), torch.full((1, kv, s, hd), 7.0)
                kc2, vc2 = kc.clone(), vc.clone()
                q = ops.quant_linear_rope_kv_triton(x, *parts, bias, enc, bs, k, nw, 1e-6, cos, sin, pos, kc, vc, hq)
                qkv = ops.quant_linear_triton(x, *parts, bias, enc, bs, k, nw, 1e-6, None, "il4")
                qref = rope_kv_write(qkv, cos, sin, pos, kc2, vc2, hq)
                err = max((q - qref).abs().max().item(), (kc - kc2).abs().max().item(),
                          (vc - vc2).abs().max().item())
                kc[:, :, 23] = 7.0
                vc[:, :, 23] = 7.0
                untouched = bool((kc == 7.0).all() and (vc == 7.0).all())
                res[f"rope-qkv-{enc}-{extra}-{split}"] = {"err": err, "untouched": untouched}
    os.environ.pop("QRUN_IL4_SPLIT", None)
    return res


def _argmax_cases() -> dict:
    """argmax_advance against torch.argmax over three calls that reuse the scratch: ties (the first index must
    win, also across the kernel's slices), all-negative rows, -inf, a vocabulary that is not a multiple of the
    kernel's block; ids written in place, the position advanced once a call."""
    import torch

    from qrun.kernels.argmax import argmax_advance

    torch.manual_seed(2)
    ok = True
    v = 5000
    ids = torch.zeros(3, 1, dtype=torch.long)
    pos = torch.tensor([41])
    for call in range(3):
        logits = torch.randn(3, v)
        if call == 0:
            logits[0, 4999] = logits[0, 17] = 50.0  # a tie across slices: 17 wins
            logits[1] = -torch.rand(v) - 1.0        # every logit negative
            logits[2, :2500] = float("-inf")
        if call == 1:
            logits[:, 1030] = logits[:, 1025] = 9.0  # a tie inside one slice
        argmax_advance(logits, ids, pos)
        ok &= bool(torch.equal(ids.view(-1), logits.argmax(-1)))
        ok &= int(pos) == 42 + call
    return {"argmax": ok}


@pytest.fixture(scope="module")
def results():
    from interpret import run_interpreted
    return run_interpreted(__file__)


def test_rms_norm(results):
    for dt in ("torch.float32", "torch.bfloat16"):
        assert results[f"norm-{dt}"] <= 1e-5


def test_rope_cache_write(results):
    assert results["rope-q"] <= 1e-5 and results["rope-k"] <= 1e-5 and results["rope-v"] == 0.0
    assert results["rope-untouched"] == 0.0  # only position 37 was written


@pytest.mark.parametrize("case", ["100-37", "700-650", "700-0", "1000-999"])
def test_decode_attention(results, case):
    assert results[f"attn-{case}"] <= 1e-5  # NaN (a read past the token) fails this too


@pytest.mark.parametrize("case", ["100-37", "700-650", "700-0", "1000-999", "bf16", "bf16-kernel-combine"])
def test_rope_attention_fused(results, case):
    r = results[f"rope-attn-{case}"]
    assert r["ok"], r
    assert r["err"] <= (1e-2 if case.startswith("bf16") else 1e-5), r


def test_quant_embedding(results):
    cases = {k: v for k, v in results.items() if k.startswith("emb-")}
    assert len(cases) == 4 * 2 * 3
    assert all(cases.values()), [k for k, v in cases.items() if not v]


def test_argmax_advance(results):
    assert results["argmax"]


def test_rope_in_qkv_gemv(results):
    cases = {k: v for k, v in results.items() if k.startswith("rope-qkv-")}
    assert len(cases) == 2 * 2 * 2
    for name, r in cases.items():
        assert r["untouched"], name  # only the token's cache row is written
        assert r["err"] <= 1e-4, (name, r)  # the same float32 sums, rotated in another kernel


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(json.dumps(_run()))
