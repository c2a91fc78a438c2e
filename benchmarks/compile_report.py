"""Registers, spills and SASS size of the word GEMV for sm_90, compiled ahead of time on this machine (no GPU
needed: triton's bundled ptxas and cuobjdump). Leads only: the device may run another triton version.

    python3 benchmarks/compile_report.py [--configs 4x8x1,8x8x1] [--silu] [--norm] [--sass] [--il4 | --tc16]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qrun.kernels.gemv4 import gemv_int4_kernel  # noqa: E402
from qrun.kernels.gemv_il import gemv_il4_kernel  # noqa: E402
from qrun.kernels.gemv_tc import gemv_tc16_kernel  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_gemv(block_n, g, warps, silu=False, norm=False, res=False, persist=False, pdl=False, enc="int4_sym"):
    sig = {n: t for n, t in zip(
        ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "bias_ptr", "nw_ptr", "res_ptr", "y_ptr", "N_OUT", "K", "NB",
         "stride_wn", "stride_sn", "stride_zn", "eps"),
        ("*bf16", "*i32", "*fp16", "*fp16", "*fp16", "*bf16", "*bf16", "*bf16") + ("i32",) * 6 + ("fp32",))}
    const = dict(ENC=enc, B=128, HAS_BIAS=False, SILU=silu, NORM=norm, HAS_RES=res, BLOCK_N=block_n, G=g,
                 PERSIST=persist, PDL=pdl, INTERPRET=False)
    sig.update({k: "constexpr" for k in const})
    # pointers, N_OUT, K and the strides divisible by 16, as triton specializes them at launch on the 7B shapes
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13)}
    return triton.compile(ASTSource(gemv_int4_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=1))


def compile_il4(r4, g, warps, silu=False, norm=False, res=False, pdl=False, enc="int4_sym", split=1):
    sig = {n: t for n, t in zip(
        ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "bias_ptr", "nw_ptr", "res_ptr", "y_ptr", "part_ptr", "cnt_ptr",
         "N_OUT", "K", "NB", "NBS", "eps"),
        ("*bf16", "*i32", "*fp16", "*fp16", "*fp16", "*bf16", "*bf16", "*bf16", "*fp32", "*i32", "i32", "i32",
         "i32", "i32", "fp32"))}
    const = dict(ENC=enc, B=128, HAS_BIAS=False, SILU=silu, NORM=norm, HAS_RES=res, R4=r4, G=g, DEEP=False,
                 SPLIT=split, PDL=pdl, INTERPRET=False)
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(12)}
    return triton.compile(ASTSource(gemv_il4_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=1))


def compile_tc16(warps, deep, silu=False, res=False, pdl=False, enc="int4_sym"):
    sig = {n: t for n, t in zip(
        ("x32_ptr", "w_ptr", "s_ptr", "z_ptr", "bias_ptr", "res_ptr", "y_ptr", "part_ptr", "cnt_ptr", "N_OUT", "K",
         "NB", "NQ"),
        ("*i32", "*i32", "*fp16", "*fp16", "*bf16", "*bf16", "*bf16", "*fp32", "*i32", "i32", "i32", "i32", "i32"))}
    const = dict(ENC=enc, B=128, HAS_BIAS=False, SILU=silu, HAS_RES=res, F16=False, KFULL=True, WARPS=warps, DEEP=deep, CG=False, SPLIT=1,
                 PDL=pdl, INTERPRET=False)
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(12)}
    return triton.compile(ASTSource(gemv_tc16_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=1))


def report(k):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True).stdout
    regs = re.search(r"REG:(\d+)", res).group(1)
    local = re.search(r"LOCAL:(\d+)", res).group(1)
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    return regs, local, ops, sass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="4x8x1,8x8x1,16x8x4,4x32x4")
    ap.add_argument("--silu", action="store_true")
    ap.add_argument("--norm", action="store_true")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--il4", action="store_true", help="the il4 kernel; configs are R4 x G x warps")
    ap.add_argument("--tc16", action="store_true", help="the tc16 kernel; configs are warps x deep x 0")
    a = ap.parse_args()
    for cfg in a.configs.split(","):
        bn, g, w = map(int, cfg.split("x"))
        if a.tc16:
            k = compile_tc16(bn, bool(g), silu=a.silu, res=a.norm)
        else:
            k = (compile_il4 if a.il4 else compile_gemv)(bn, g, w, silu=a.silu, norm=a.norm, res=a.norm)
        regs, local, ops, sass = report(k)
        hist = {}
        for o in ops:
            o = o.split(".")[0]
            hist[o] = hist.get(o, 0) + 1
        top = " ".join(f"{k}:{v}" for k, v in sorted(hist.items(), key=lambda kv: -kv[1])[:8])
        top += f" | BAR:{hist.get('BAR', 0)} LDS:{hist.get('LDS', 0)}"
        print(f"{cfg:10s} regs {regs:>4s} local {local:>4s} sass {len(ops):5d}  {top}")
        if a.sass:
            print(sass)


if __name__ == "__main__":
    main()
