"""Compile every Triton kernel qrun launches on CUDA, in the variants and configs the launchers can pick, for
sm_90 ahead of time, on a machine without a GPU (triton's bundled ptxas). It finds what the interpreter
cannot: front-end limits of the triton on the device (round 6, docs/PERF.md: a tl.dot of depth 8 that
triton 3.9 compiled and the device's triton 3.6 refused), register overflow, ptxas errors.

The device runs triton 3.6; CI and this machine 3.9. To check against the device's version here:

    pip download --no-deps triton==3.6.0 -d /tmp/tri36 && pip install --no-deps --target /tmp/t36 /tmp/tri36/*.whl
    PYTHONPATH=/tmp/t36 python3 benchmarks/compile_check.py [--only tc16,rope_attention]

Prints one line per kernel family and the failures; exit status 1 when any variant fails to compile. It also
counts the variants whose wgmmas ptxas serializes (its info C7515: a wait after every MMA) and names them, and
fails a variant whose SASS writes the register operand of a wgmma still in flight (rs_wgmma_hazards; PERF.md
attempt 61).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qrun.kernels import ops  # noqa: E402
from qrun.kernels.argmax import argmax_advance_kernel  # noqa: E402
from qrun.kernels.decode_attention import combine_kernel, decode_attention_kernel, rope_attention_kernel  # noqa: E402
from qrun.kernels.embedding import quant_embedding_kernel  # noqa: E402
from qrun.kernels.gemm import gemm_kernel  # noqa: E402
from qrun.kernels.gemv import gemv_kernel  # noqa: E402
from qrun.kernels.gemv4 import gemv_int4_kernel  # noqa: E402
from qrun.kernels.gemv_il import gemv_il4_kernel  # noqa: E402
from qrun.kernels.gemv_tc import gemv_tc16_kernel  # noqa: E402
from qrun.kernels.rmsnorm import rms_norm_kernel  # noqa: E402
from qrun.kernels.rope_cache import rope_cache_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"eps", "scale"}


def compile_one(kernel, types: dict, const: dict, num_warps: int = 4, num_stages: int = 3):
    """kernel's runtime arguments typed by name (pointers "*bf16" ..., the rest i32 or fp32 by default);
    const: its constexpr arguments, defaults filled in from the signature."""
    sig, consts = {}, {}
    for name, p in zip(kernel.arg_names, kernel.params):
        if p.is_constexpr:
            consts[name] = const[name] if name in const else p.default
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "fp32" if name in FLOATS else "i32")
    # pointers 16-byte aligned as torch allocates them, and sizes and strides multiples of 16 as at the models'
    # shapes: triton specializes both at launch, and vector widths (hence what the pipeliner takes) follow
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n].startswith("*") or sig[n] == "i32"}
    src = ASTSource
    if getattr(kernel, "is_gluon", lambda: False)():  # a Gluon kernel (gemm_wg.py)
        from triton.experimental.gluon._runtime import GluonASTSource as src
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if "maxnreg" in const:  # a launch option, as the launcher passes it (the warp-specialized GEMM)
        opts["maxnreg"] = const["maxnreg"]
    return triton.compile(src(kernel, sig, consts, attrs), target=TARGET, options=opts)


def wgmma_hazards(k) -> list[str]:
    """rs_wgmma_hazards over the kernel's K loop (none when it has no wgmma with a register operand)."""
    if "wgmma.mma_async" not in k.asm["ptx"]:
        return []
    import compile_report as cr
    return rs_wgmma_hazards(k_loop(cr.report(k)[3]))


def _ptxas_info(k) -> str:
    """ptxas -v's info lines for a compiled kernel: triton's own ptxas call keeps them to itself, so the PTX goes
    through the bundled ptxas again."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    return r.stderr


def wgmma_serialized(k) -> str:
    """ptxas's C7515 message for a compiled kernel whose wgmmas it serializes, else ""."""
    if "wgmma.mma_async" not in k.asm["ptx"]:
        return ""
    return next((ln.split("Potential Performance Loss: ")[-1] for ln in _ptxas_info(k).splitlines()
                 if "C7515" in ln), "")


def spill_bytes(k) -> int:
    """Bytes of spill stores, as ptxas -v counts them. The cubin's LOCAL attribute (compile_report) reads 0 for a
    warp-specialized kernel that spills (its partitions' stack is counted apart)."""
    m = re.search(r"(\d+) bytes spill stores", _ptxas_info(k))
    return int(m.group(1)) if m else 0


def k_loop(sass: str) -> list[str]:
    """The instructions of the loop that holds the HGMMAs: from a backward branch's target to the branch."""
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,6}\*/", ln)]
    ins = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", ln).split(";")[0].strip() for ln in lines]
    addr = [int(re.search(r"/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    for i, s in enumerate(ins):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", s)
        if m and int(m.group(1), 16) < addr[i] and int(m.group(1), 16) in addr:
            body = ins[addr.index(int(m.group(1), 16)):i + 1]
            if any("HGMMA" in b for b in body):
                return body
    return []


def loop_sizes(sass: str) -> list[tuple[int, str]]:
    """Every innermost loop of the SASS (a backward branch whose body holds no other): (instructions, its most
    frequent opcodes). `--loops` prints them: the Gluon GEMMs' K loops, e.g. the dequantizing partition's step
    (PERF.md attempt 70)."""
    from collections import Counter
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,6}\*/", ln)]
    ins = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", ln).split(";")[0].strip() for ln in lines]
    addr = [int(re.search(r"/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    loops = []
    for i, s in enumerate(ins):
        m = re.search(r"BRA\s+(?:!?U?P\d, )?0x([0-9a-f]+)", s)
        if m and int(m.group(1), 16) < addr[i] and int(m.group(1), 16) in addr:
            loops.append((addr.index(int(m.group(1), 16)), i))
    out = []
    for a, b in loops:
        if any(a <= a2 and b2 <= b and (a2, b2) != (a, b) for a2, b2 in loops):
            continue  # not innermost
        opc = Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in ins[a:b + 1] if x)
        if b - a + 1 >= 50:  # spin-waits on an mbarrier are a few instructions
            out.append((b - a + 1, " ".join(f"{o}:{c}" for o, c in opc.most_common(6))))
    return out


_NO_REG_DEST = ("ST", "RED", "BAR", "BRA", "EXIT", "DEPBAR", "WARPGROUP", "LDGSTS", "LDGDEPBAR", "NOP", "SYNCS",
                "MEMBAR", "FENCE", "CCTL", "ERRBAR", "WARPSYNC", "HGMMA")


def _dest_regs(ins: str) -> set[int]:
    """General registers an instruction writes (its first operand), by the width its opcode names."""
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    op, _, args = ins.partition(" ")
    m = re.match(r"\s*R(\d+)\b", args)
    if not m or op.startswith(_NO_REG_DEST):
        return set()
    n = 4 if ".128" in op else 2 if (".64" in op or "WIDE" in op) else 1
    if op.startswith("LDSM"):
        n = int(op.rsplit(".", 1)[-1]) if op.rsplit(".", 1)[-1] in ("2", "4") else 1
    return set(range(int(m.group(1)), int(m.group(1)) + n))


def rs_wgmma_hazards(body: list[str]) -> list[str]:
    """Writes to the register A operand of a wgmma still in flight, in a K loop's SASS (k_loop), followed around
    the loop twice. PTX leaves it to the program to wait (wgmma.wait_group) before it touches those registers;
    triton 3.6's pipeliner leaves up to N - 1 of a K step's N wgmmas in flight (only the oldest is waited
    for), so the next step's dequantization may overwrite an in-flight operand (triton issue 9433, PERF.md
    attempt 61). An HGMMA's A is 4 registers (64 x 16 bf16 over a warpgroup). HGMMAs form commit groups, each
    closed by the one marked `gsb0`; `WARPGROUP.DEPBAR.LE gsb0, N` leaves the newest N groups in flight."""
    groups: list[list[tuple[int, set[int]]]] = []  # in flight, oldest first; the last may still be open
    open_group = False
    found = []
    for rnd in range(2):
        for i, ins in enumerate(body):
            m = re.search(r"HGMMA\.\S+\s+R\d+,\s+R(\d+),", ins)
            if m:
                if not open_group:
                    groups.append([])
                groups[-1].append((i, set(range(int(m.group(1)), int(m.group(1)) + 4))))
                open_group = not re.search(r"\bgsb0\s*$", ins)
                continue
            m = re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s+0x([0-9a-f]+)", ins)
            if m:
                keep = int(m.group(1), 16)
                groups = groups[len(groups) - keep:] if keep else []
                continue
            hit = [j for g in groups for j, regs in g if regs & _dest_regs(ins)]
            if hit and rnd == 1:
                found.append(f"{i}: {ins}  (A operand of the HGMMA at {hit[0]})")
    return found


def ptrs(names, dt, **override):
    return {n: override.get(n, f"*{dt}") for n in names}


def tc16_variants():
    base = ("x32_ptr", "w_ptr", "s_ptr", "z_ptr", "bias_ptr", "res_ptr", "y_ptr", "part_ptr", "cnt_ptr")
    for c in ops._tc16_candidates(every=True):
        # (encoding, fp16, SILU, bias + residual, KFULL, PDL)
        for enc, f16, silu, extra, kfull, pdl in (("int4_sym", False, False, False, True, False),
                                                  ("int4_asym", True, False, True, False, True),
                                                  ("int4_sym", False, True, False, True, True)):
            dt = "fp16" if f16 else "bf16"
            yield (gemv_tc16_kernel, ptrs(base, dt, x32_ptr="*i32", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8",
                                          part_ptr="*fp32", cnt_ptr="*i32"),
                   dict(ENC=enc, B=128, HAS_BIAS=extra, SILU=silu, HAS_RES=extra, F16=f16, KFULL=kfull,
                        WARPS=c["WARPS"], DEEP=c["DEEP"], CG=c["CG"], SPLIT=c["SPLIT"], PDL=pdl, INTERPRET=False),
                   c["num_warps"], c["num_stages"])


VARIANTS = (("int4_sym", False, False, False, False), ("int4_asym", True, False, True, True),
            ("int4_sym", False, True, True, True))


def il4_variants():
    base = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "bias_ptr", "nw_ptr", "res_ptr", "y_ptr", "part_ptr", "cnt_ptr")
    # (encoding, SILU, bias + residual, RMSNorm, PDL): as the launcher combines them (SILU never has a bias)
    for c, (enc, silu, extra, norm, pdl) in itertools.product(ops._il4_candidates(28), VARIANTS):
        c = dict(c)
        nw, ns = c.pop("num_warps"), c.pop("num_stages", 1)
        yield (gemv_il4_kernel, ptrs(base, "bf16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", part_ptr="*fp32",
                                     cnt_ptr="*i32"),
               dict(ENC=enc, B=128, HAS_BIAS=extra, SILU=silu, NORM=norm, HAS_RES=extra, PDL=pdl,
                    INTERPRET=False, **c), nw, ns)


def il4_rope_variants():
    """The qkv GEMV with RoPE and the cache write in its epilogue (QRUN_ROPE_QKV): its R4 = 2 configs, head dim
    128, with and without bias and the fused norm."""
    base = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "bias_ptr", "nw_ptr", "res_ptr", "y_ptr", "part_ptr", "cnt_ptr",
            "cos_ptr", "sin_ptr", "pos_ptr", "kc_ptr", "vc_ptr")
    for c, enc, extra in itertools.product(ops._il4_candidates(28, ops.IL4_ROPE_TABLE), ("int4_sym", "int4_asym"),
                                           (False, True)):
        c = dict(c)
        nw, ns = c.pop("num_warps"), c.pop("num_stages", 1)
        yield (gemv_il4_kernel, ptrs(base, "bf16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", res_ptr="*fp16",
                                     part_ptr="*fp32", cnt_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32",
                                     pos_ptr="*i64"),
               dict(ENC=enc, B=128, HAS_BIAS=extra, SILU=False, NORM=extra, HAS_RES=False, PDL=True,
                    INTERPRET=False, ROPE=128, **c), nw, ns)


def gemv4_variants():
    base = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "bias_ptr", "nw_ptr", "res_ptr", "y_ptr")
    for c, (enc, silu, extra, norm, pdl) in itertools.product(ops._gemv4_candidates(128, 28), VARIANTS):
        c = dict(c)
        nw, ns = c.pop("num_warps"), c.pop("num_stages", 1)
        per_sm = c.pop("PER_SM", 0)
        yield (gemv_int4_kernel, ptrs(base, "bf16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8"),
               dict(ENC=enc, B=128, HAS_BIAS=extra, SILU=silu, NORM=norm, HAS_RES=extra, PERSIST=per_sm > 0,
                    PDL=pdl, INTERPRET=False, **c), nw, ns)


def gemv_variants():
    base = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "code_ptr", "bias_ptr", "y_ptr")
    for enc in ("int8_sym", "nf4", "int4_sym"):
        for c in ops._gemv_candidates(enc, 128, 28):
            c = dict(c)
            nw, ns = c.pop("num_warps"), c.pop("num_stages", 1)
            yield (gemv_kernel, ptrs(base, "bf16", w_ptr="*u8", s_ptr="*fp16", z_ptr="*u8", code_ptr="*fp32"),
                   dict(ENC=enc, B=128, HAS_BIAS=True, SILU=enc == "int4_sym", INTERPRET=False, **c), nw, ns)


def gemm_variants():
    base = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "code_ptr", "bias_ptr", "y_ptr")
    for m, lay, (enc, silu) in itertools.product((3, 64, 1024), (0, 1, 2), (("int4_sym", False),
                                                                           ("int4_asym", True))):
        for c in ops._gemm_candidates(m, 128):
            if c.get("WG"):  # the Gluon GEMM: family gemm_wg
                continue
            c = dict(c)
            nw, ns = c.pop("num_warps"), c.pop("num_stages")
            # M = 1024 on il4 (prefill of the real models: whole tiles) without load masks, as the launcher runs it
            yield (gemm_kernel, ptrs(base, "bf16", w_ptr="*u8", s_ptr="*fp16", z_ptr="*u8", code_ptr="*fp32"),
                   dict(ENC=enc, B=128, HAS_BIAS=not silu, SILU=silu, SPLIT_K=1 if silu or m > 64 else 4,
                        LAY=lay, INTERPRET=False, EVEN=m == 1024 and lay == 1, **c), nw, ns)
    for c in ops._gemm_candidates(64, 128):  # int8 and nf4 have only the canonical layout
        c = dict(c)
        nw, ns = c.pop("num_warps"), c.pop("num_stages")
        for enc in ("int8_sym", "nf4"):
            yield (gemm_kernel, ptrs(base, "fp16", w_ptr="*u8", s_ptr="*fp16", z_ptr="*u8", code_ptr="*fp32"),
                   dict(ENC=enc, B=128, HAS_BIAS=False, SILU=False, SPLIT_K=1, LAY=0, INTERPRET=False, **c), nw, ns)


def gemm_wg_variants():
    """The Gluon GEMM (gemm_wg.py) in every config the launcher offers, sym and asym, with a bias (Qwen2's qkv)
    and as gate+up, with and without masks, bf16 and fp16."""
    from qrun.kernels.gemm_wg import W_LAYOUT as wl, X_LAYOUT as xl, gemm_il4_wg_kernel, gemm_il4_ws_kernel
    for c in ops._gemm_candidates(1024, 128, "il4"):
        if not c.get("WG"):
            continue
        bn, bm = c["BLOCK_N"], c["BLOCK_M"]
        kernel, extra = gemm_il4_wg_kernel, {}
        if c.get("WS"):  # the warp-specialized variant
            kernel = gemm_il4_ws_kernel
            extra = dict(QSTAGES=c["QSTAGES"], WSTAGES=c["WSTAGES"], DQ_WARPS=c["DQ_WARPS"], DQ_REGS=c["maxnreg"],
                         maxnreg=c["maxnreg"])
        for asym, silu, even, dt in ((False, False, True, "bf16"), (True, False, False, "bf16"),
                                     (False, True, True, "bf16"), (True, True, False, "fp16")):
            if not ops.wg_config_ok(c, silu):
                continue
            types = ptrs(("s_ptr", "z_ptr", "bias_ptr", "y_ptr", "part_ptr", "cnt_ptr"), dt, s_ptr="*fp16",
                         z_ptr="*u8", part_ptr="*fp32", cnt_ptr="*i32")
            types["x_desc"] = f"tensordesc<{dt}[{bm}, 64],{xl!r}>"
            types["w_desc"] = f"tensordesc<i32[{bn // 8 if silu else bn // 4}, 32],{wl!r}>"
            yield (kernel, types,
                   dict(B=128, ASYM=asym, HAS_BIAS=not silu, SILU=silu, BLOCK_N=bn, BLOCK_M=bm,
                        STAGES=c["num_stages"], EVEN=even, num_warps=c["num_warps"], **extra), c["num_warps"], 1)


def gemv_mma_variants(few: bool = False):
    """The tensor-core GEMV (gemv_mma.py) in every config the launcher offers at K = 3584 and 18944, across
    sym / asym, bf16 / fp16, SILU, RMSNorm, bias and residual. few: a split and an AHEAD 2 config at K = 3584
    (CI's share)."""
    from qrun.kernels.gemv_mma import gemv_il4_mma_kernel
    base = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "bias_ptr", "nw_ptr", "res_ptr", "y_ptr", "part_ptr", "cnt_ptr")
    for nb in ((28,) if few else (28, 148)):
        cands = ops._mma_candidates(nb)
        if few:
            cands = [c for c in cands if (c["SPLIT"], c["AHEAD"]) in ((2, 1), (4, 2))][:2]
        for c in cands:
            for (enc, silu, extra, norm, pdl), dt in zip(VARIANTS + (("int4_asym", True, False, True, True),),
                                                         ("bf16", "fp16", "bf16", "bf16")):
                yield (gemv_il4_mma_kernel, ptrs(base, dt, w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8",
                                                 part_ptr="*fp32", cnt_ptr="*i32"),
                       dict(ENC=enc, HAS_BIAS=extra, SILU=silu, NORM=norm, HAS_RES=extra, F16=dt == "fp16",
                            NBS=-(-nb // c["SPLIT"]), SPLIT=c["SPLIT"], AHEAD=c["AHEAD"], PDL=int(pdl), KNOCK=0,
                            num_warps=c["num_warps"]), c["num_warps"], 1)


def attention_variants():
    # head_dim 16 (the tests' tiny configs), 64 (Qwen2-0.5B, SmolLM2), 128 (Qwen2.5-7B); float32 and bf16
    for hd, dt, g, nsplit in ((16, "fp32", 2, 2), (64, "bf16", 7, 1), (64, "bf16", 3, 16), (128, "bf16", 7, 64),
                              (128, "fp16", 1, 4)):
        prec = "ieee" if dt == "fp32" else "tf32"
        gp = max(16, triton.next_power_of_2(g))
        att = dict(G=g, GP=gp, HD=hd, BLOCK_S=64, NSPLIT=nsplit, INTERPRET=False, PREC=prec)
        yield (rope_attention_kernel,
               ptrs(rope_attention_kernel.arg_names[:11], dt, cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64",
                    cnt_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32", o_ptr="*fp32"), dict(att, PDL=True), 4, 3)
        if nsplit > 1:  # QRUN_FUSED_ATTN=2: the combine left to combine_kernel
            yield (rope_attention_kernel,
                   ptrs(rope_attention_kernel.arg_names[:11], dt, cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64",
                        cnt_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32", o_ptr="*fp32"),
                   dict(att, PDL=True, COMBINE=False), 4, 3)
        yield (decode_attention_kernel,
               ptrs(decode_attention_kernel.arg_names[:8], dt, pos_ptr="*i64", m_ptr="*fp32", l_ptr="*fp32",
                    o_ptr="*fp32"), dict(att, PDL=True), 4, 3)
        yield (combine_kernel, ptrs(("m_ptr", "l_ptr", "o_ptr", "y_ptr"), "fp32", y_ptr=f"*{dt}"),
               dict(HD=hd, NSPLIT=max(nsplit, 2), PDL=True), 1, 3)
        yield (rope_cache_kernel, ptrs(rope_cache_kernel.arg_names[:7], dt, cos_ptr="*fp32", sin_ptr="*fp32",
                                       pos_ptr="*i64"), dict(HD=hd, INTERPRET=False, PDL=True), 1, 3)
    for dt, block in (("bf16", 1024), ("fp32", 4096)):
        yield (rms_norm_kernel, ptrs(("x_ptr", "w_ptr", "y_ptr"), dt), dict(BLOCK=block, INTERPRET=False, PDL=True),
               4, 3)


def step_variants():
    # the decode step's head and tail: the quantized embedding lookup (every encoding) and the greedy argmax
    for enc, dt in (("int8_sym", "bf16"), ("int4_sym", "fp16"), ("int4_asym", "bf16"), ("nf4", "fp32")):
        yield (quant_embedding_kernel, ptrs(quant_embedding_kernel.arg_names[:6], dt, ids_ptr="*i64",
                                            w_ptr="*i8" if enc == "int8_sym" else "*u8", s_ptr="*fp16",
                                            z_ptr="*u8", code_ptr="*fp32"),
               dict(ENC=enc, B=128, BLOCK=1024, PDL=True, INTERPRET=False), 4, 3)
    yield (argmax_advance_kernel, ptrs(argmax_advance_kernel.arg_names[:5], "i64", l_ptr="*fp32", cnt_ptr="*i32"),
           dict(BLOCK=4096, BB=1, PDL=True), 4, 3)


FAMILIES = {"tc16": tc16_variants, "il4": il4_variants, "il4_rope": il4_rope_variants, "gemv4": gemv4_variants, "gemv": gemv_variants,
            "gemm": gemm_variants, "gemm_wg": gemm_wg_variants, "gemv_mma": gemv_mma_variants,
            "gemv_mma_few": lambda: gemv_mma_variants(few=True),
            "attention": attention_variants, "step": step_variants}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(FAMILIES), help="comma-separated families: " + ",".join(FAMILIES))
    ap.add_argument("--loops", action="store_true", help="print each variant's innermost loops of 50 or more SASS "
                    "instructions (size and most frequent opcodes)")
    a = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90", flush=True)
    failed = 0
    for fam in a.only.split(","):
        t, n, bad, serial = time.perf_counter(), 0, [], []
        for kernel, types, const, nw, ns in FAMILIES[fam]():
            n += 1
            try:
                k = compile_one(kernel, types, const, nw, ns)
                why = wgmma_serialized(k)
                hz = wgmma_hazards(k)
            except Exception as e:  # noqa: BLE001 (report every failing variant, then fail)
                msg = str(e).strip().splitlines()
                bad.append(f"  {kernel.fn.__name__} {const} warps={nw}: {msg[-1] if msg else type(e).__name__}")
                continue
            if a.loops:
                import compile_report as cr
                for size, opc in loop_sizes(cr.report(k)[3]):
                    print(f"  {kernel.fn.__name__} {const}: loop of {size} instructions ({opc})", flush=True)
            if why:
                serial.append(f"  serialized wgmma: {kernel.fn.__name__} {const} warps={nw}: {why}")
            if hz:  # a correctness failure, not a performance note
                bad.append(f"  {kernel.fn.__name__} {const} warps={nw}: {len(hz)} writes to an in-flight wgmma "
                           f"operand, first {hz[0]}")
        print(f"{fam:10s} {n - len(bad):3d}/{n:<3d} compiled  {len(serial):3d} with serialized wgmma  "
              f"{time.perf_counter() - t:6.1f} s", flush=True)
        for line in bad + serial:
            print(line, flush=True)
        failed += len(bad)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
