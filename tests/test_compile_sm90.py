"""The CUDA kernels compile for sm_90 ahead of time, on a machine without a GPU (triton's bundled ptxas):
the decode attention kernels at head_dim 16, 64 and 128 and every tensor-core GEMV config. The interpreter
runs the kernels' arithmetic (and not Gluon's at all: the tensor-core GEMV) but not the compiler's checks (round 6: a tl.dot of depth 8). The full set of
variants, against the device's triton, is benchmarks/compile_check.py."""
import os
import shutil
import sys

import pytest

triton = pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        return False
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(path) or shutil.which("ptxas") is not None


pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or not _has_ptxas(),
                                reason="needs triton's nvidia backend with ptxas, and not the interpreter")


@pytest.mark.parametrize("family", ["attention", "tc16", "il4_rope", "gemv_mma_few"])
def test_kernels_compile_for_sm90(family):
    import compile_check
    failed = []
    for kernel, types, const, nw, ns in compile_check.FAMILIES[family]():
        try:
            k = compile_check.compile_one(kernel, types, const, nw, ns)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{kernel.fn.__name__} {const}: {str(e).strip().splitlines()[-1:]}")
            continue
        assert k.asm["cubin"], kernel.fn.__name__
    assert not failed, "\n".join(failed)


def test_gemm_never_overwrites_an_operand_in_flight():
    """No GEMM variant among those the launcher compiles writes the register A operand of a wgmma still in flight
    (compile_check.rs_wgmma_hazards on the K loop's SASS; the race of triton issue 9433, gemm.py's _wgmma_done):
    M = 1024 configs on il4 with a bias and as gate+up, and the split-K configs of M <= 64. Before _wgmma_done,
    the device's triton 3.6 gave such writes in the bias, gate+up and split-K variants (docs/PERF.md attempt 61)."""
    import compile_check as cc

    from qrun.kernels import ops
    from qrun.kernels.gemm import gemm_kernel
    types = cc.ptrs(("x_ptr", "w_ptr", "s_ptr", "z_ptr", "code_ptr", "bias_ptr", "y_ptr"), "bf16", w_ptr="*u8",
                    s_ptr="*fp16", z_ptr="*u8", code_ptr="*fp32")
    bad = []
    triton_cfgs = [c for c in ops._gemm_candidates(1024, 128, "il4") if not c.get("WG")]  # WG: the Gluon GEMM
    variants = [(1024, c, silu, 1) for c in triton_cfgs[:4] for silu in (False, True)]
    variants += [(64, c, False, 4) for c in ops._gemm_candidates(64, 128, "il4")]
    for m, c, silu, split in variants:
        c = dict(c)
        nw, ns = c.pop("num_warps"), c.pop("num_stages")
        const = dict(ENC="int4_asym", B=128, HAS_BIAS=not silu, SILU=silu, SPLIT_K=split, LAY=1, INTERPRET=False,
                     EVEN=m == 1024, **c)
        hz = cc.wgmma_hazards(cc.compile_one(gemm_kernel, types, const, nw, ns))
        if hz:
            bad.append(f"M {m} {c} silu {silu} split {split}: {len(hz)} writes to an in-flight wgmma operand, "
                       f"first {hz[0]}")
    assert not bad, "\n".join(bad)


def test_wgmma_hazard_check_sees_an_overwritten_operand():
    """rs_wgmma_hazards on hand-written SASS: a write to the A registers (R100-R103) of an HGMMA still in flight
    is found, also one that comes around the loop's back edge; after a wait that retires it, it is not."""
    import compile_check as cc
    hg = "HGMMA.64x128x16.F32.BF16 R24, R100, gdesc[UR12], R24, gsb0"
    assert cc.rs_wgmma_hazards([hg, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "LOP3.LUT R101, R1, 0xf, RZ, 0xc0, !PT"])
    assert cc.rs_wgmma_hazards(["LDS.128 R100, [R8+0x100]", hg, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "BRA 0x10"])
    assert not cc.rs_wgmma_hazards([hg, "WARPGROUP.DEPBAR.LE gsb0, 0x0", "LDS.128 R100, [R8+0x100]"])
    assert not cc.rs_wgmma_hazards([hg, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "FADD R104, R1, R2", "STS [R100], R3"])
    # a commit group of two HGMMAs (only the last carries gsb0): keeping the newest group keeps both in flight
    h1 = "HGMMA.64x128x16.F32.BF16 R24, R100, gdesc[UR12], R24"
    h2 = "HGMMA.64x128x16.F32.BF16 R24, R104, gdesc[UR16], R24, gsb0"
    assert cc.rs_wgmma_hazards([h1, h2, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "LOP3.LUT R101, R1, 0xf, RZ, 0xc0, !PT"])
    assert not cc.rs_wgmma_hazards([h1, h2, "WARPGROUP.DEPBAR.LE gsb0, 0x0", "LOP3.LUT R101, R1, 0xf, RZ, 0xc0, !PT"])


def test_gluon_gemm_compiles_unserialized_without_spills():
    """The Gluon GEMMs (gemm_wg.py) compile for sm_90 in every config the launcher offers (sym and asym, bias and
    gate+up, masked and not, bf16 and fp16), without spills in the K loop, and ptxas keeps their wgmmas in flight
    (no info C7515: zeros reaching the accumulator outside a wgmma serialized them in the Triton GEMM, PERF.md
    attempt 61). The waits themselves are checked on the GPU (tests/test_kernels_gpu.py)."""
    import compile_check as cc
    import compile_report as cr
    bad = []
    for kernel, types, const, nw, ns in cc.gemm_wg_variants():
        k = cc.compile_one(kernel, types, const, nw, ns)
        regs, local, _, sass = cr.report(k)
        # LOCAL reads 0 for the warp-specialized kernel's spills. It may park a few values (two registers in
        # its SILU asym variant, stored before the K loop, read back in a tile's epilogue), but no spill store
        # may sit in the loop, where every step would pay for it
        spills = cc.spill_bytes(k)
        loop_spills = sum(ins.startswith("STL") for ins in cc.k_loop(sass))
        spills = spills if spills > 16 or loop_spills else 0
        why = cc.wgmma_serialized(k)
        if int(local) or spills or why or "wgmma.mma_async" not in k.asm["ptx"]:
            bad.append(f"{const}: {regs} registers, {local} bytes local, {spills} bytes spilled, "
                       f"{why or 'not serialized'}")
    assert not bad, "\n".join(bad)
