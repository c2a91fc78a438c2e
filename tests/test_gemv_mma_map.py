"""The tensor-core GEMV's PTX (qrun/kernels/gemv_mma.step_asm) run on the CPU by a small PTX interpreter for the
instructions it uses, with mma.m16n8k16's fragment layout as the PTX ISA states it. Gluon has no interpreter, so
this is how CI checks the nibble selectors, the register order of the A fragments and the x pairs: one block of
128 k for a warp's 8 row groups (32 rows), against sum_k q_k x_k from the il4 words read the plain way."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("triton.experimental.gluon")
from qrun.kernels.gemv_mma import step_asm  # noqa: E402

LANES = 32


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for i in range(8):
        if lut >> i & 1:
            ta = a if i & 4 else ~a
            tb = b if i & 2 else ~b
            tc = c if i & 1 else ~c
            out |= ta & tb & tc
    return out


def _prmt(a, b, sel):
    tmp = a.astype(np.uint64) | (b.astype(np.uint64) << np.uint64(32))
    out = np.zeros_like(a)
    for i in range(4):
        s = sel >> (4 * i) & 0xF
        assert s < 8, "sign replication not used"
        out |= ((tmp >> np.uint64(8 * s)) & np.uint64(0xFF)).astype(np.uint32) << np.uint32(8 * i)
    return out


def _halves(v, f16):
    """uint32 lanes -> (low, high) 16-bit floats as float64."""
    lo = (v & 0xFFFF).astype(np.uint16)
    hi = (v >> 16).astype(np.uint16)
    if f16:
        return lo.view(np.float16).astype(np.float64), hi.view(np.float16).astype(np.float64)
    f = lambda h: (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)  # noqa: E731
    return f(lo), f(hi)


def _mma(a, b, c, f16):
    """mma.m16n8k16 .row.col, the fragment layout of the PTX ISA: lane = 4 g + t."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    C = np.zeros((16, 8))
    for lane in range(LANES):
        g, t = lane // 4, lane % 4
        for reg, (r, k) in zip(a, ((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
            lo, hi = _halves(reg[lane:lane + 1], f16)
            A[r, k], A[r, k + 1] = lo[0], hi[0]
        for reg, k in zip(b, (2 * t, 2 * t + 8)):
            lo, hi = _halves(reg[lane:lane + 1], f16)
            B[k, g], B[k + 1, g] = lo[0], hi[0]
        for reg, (r, n) in zip(c, ((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
            C[r, n] = reg[lane:lane + 1].view(np.float32)[0]
    D = A @ B + C
    out = []
    for r, n in ((0, 0), (0, 1), (8, 0), (8, 1)):
        out.append(np.array([D[lane // 4 + r, 2 * (lane % 4) + n] for lane in range(LANES)],
                            dtype=np.float32).view(np.uint32))
    return out


def run_ptx(asm: str, inputs: dict[int, np.ndarray], f16: bool) -> dict[int, np.ndarray]:
    """Interpret asm for a warp: registers are (32,) uint32 arrays (float32 bits for .f32)."""
    regs: dict[str, np.ndarray] = {f"${i}": v.astype(np.uint32) for i, v in inputs.items()}
    body = asm.strip()[1:-1]  # the { ... } scope
    for ins in (x.strip() for x in body.split(";")):
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        if op.startswith("mma."):
            groups = [g.replace(" ", "").split(",") for g in re.findall(r"\{([^}]*)\}", rest)]
            d, a, b, c = groups
            res = _mma([regs[x] for x in a], [regs[x] for x in b], [regs[x] for x in c], f16)
            for name, v in zip(d, res):
                regs[name] = v
            continue
        args = [x.strip() for x in rest.split(",")]

        def val(x):
            if x in regs:
                return regs[x]
            if x.startswith("0f"):
                return np.full(LANES, int(x[2:], 16), dtype=np.uint32)
            return np.full(LANES, int(x, 0) & 0xFFFFFFFF, dtype=np.uint32)
        if op in ("mov.b32", "mov.f32"):
            regs[args[0]] = val(args[1]).copy()
        elif op == "shr.u32":
            regs[args[0]] = val(args[1]) >> np.uint32(int(args[2], 0))
        elif op == "lop3.b32":
            regs[args[0]] = _lop3(val(args[1]), val(args[2]), val(args[3]), int(args[4], 0))
        elif op == "prmt.b32":
            regs[args[0]] = _prmt(val(args[1]), val(args[2]), int(args[3], 0))
        else:
            raise AssertionError(f"instruction not interpreted: {op}")
    return {int(k[1:]): v for k, v in regs.items() if k.startswith("$")}


def _pack(lo: torch.Tensor, hi: torch.Tensor) -> np.ndarray:
    bits = lambda t: t.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)  # noqa: E731
    return bits(lo) | (bits(hi) << 16)


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_step_asm_sums_a_block_of_32_rows(sym, f16):
    g = torch.Generator().manual_seed(7 + 2 * sym + f16)
    dt = torch.float16 if f16 else torch.bfloat16
    # one block of 128 k for 8 row groups: il4 words [rg, kw, j] = row 4 rg + j, k = 8 kw .. 8 kw + 7
    words = torch.randint(0, 2**32, (8, 16, 4), generator=g, dtype=torch.int64).to(torch.uint32)
    x = (torch.randn(128, generator=g) * 2).to(dt)
    nib = torch.stack([(words.to(torch.int64) >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [rg, kw, j, i]
    q = nib ^ 8 if sym else nib                          # the value under the offset: q + 8 (sym) or u (asym)
    q = q.permute(0, 2, 1, 3).reshape(8, 4, 128).double()  # [rg, j, k]
    off = (1024.0 if f16 else 128.0)
    want_d = ((q + off) * x.double()).sum(-1)           # [rg, j]
    want_e = x.double().sum()
    # lane (g, c): words [g, 4 s + c, j] at 4 s + j; x pairs of word position 4 s + c: (k0, k2), (k1, k3), (k4, k6),
    # (k5, k7), as gemv_il4_mma_kernel loads and stages them
    inputs = {}
    lanes = torch.arange(LANES)
    gg, cc = lanes // 4, lanes % 4
    for s in range(4):
        for j in range(4):
            inputs[16 + 4 * s + j] = words[gg, 4 * s + cc, j].numpy().astype(np.uint32)
        r = 4 * s + cc
        xs = x.reshape(16, 8)[r]                             # [lane, 8]
        for i, (lo, hi) in enumerate(((0, 2), (1, 3), (4, 6), (5, 7))):
            inputs[32 + 4 * s + i] = _pack(xs[:, lo], xs[:, hi])
    out = run_ptx(step_asm(f16, sym, True), inputs, f16)
    for j in range(4):
        got = out[j].view(np.float32).astype(np.float64)
        np.testing.assert_allclose(got, want_d[gg, j].numpy(), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(out[4].view(np.float32).astype(np.float64), np.full(LANES, want_e.item()),
                               rtol=1e-6, atol=1e-4)
    # and what the kernel makes of them: sum_k (q_k - 8) x_k for sym (q the two's complement nibble)
    d0 = out[0].view(np.float32).astype(np.float64)
    signed = ((nib ^ 8) - 8 if sym else nib).permute(0, 2, 1, 3).reshape(8, 4, 128).double()
    ref = (signed[:, 0] * x.double()).sum(-1)[gg].numpy()
    base = off + 8 if sym else off
    np.testing.assert_allclose(d0 - base * want_e.item(), ref, rtol=1e-5, atol=5e-3)


def test_step_asm_without_e_leaves_the_sum_out():
    asm = step_asm(False, True, False)
    assert asm.count("mma.sync") == 16 and "one, one" not in asm
    assert step_asm(False, True, True).count("mma.sync") == 24
