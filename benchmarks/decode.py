"""End-to-end decode benchmark at real sizes (issue 5), run on the GPU machine:

    python3 benchmarks/decode.py [--configs qwen2-0.5b,qwen2.5-7b] [--out DIR] [--runs graph,eager,...]

For each config it writes a random-weight INT4 g128 .stcmp (`qrun convert --random`), then runs `qrun bench`
in a fresh process: CUDA graph on and off, prefill of 1024 tokens, and optionally Hugging Face transformers
(BF16, eager) on the same weights. Prints one table; JSON lines go to DIR/decode.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def qrun(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "qrun.cli.main", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, 124, "", f"timed out after {timeout} s")


ENVS = {"nopdl": {"QRUN_PDL": "0"}, "cap12m": {"QRUN_FUSE_MAX_WEIGHTS": "12000000"},
        "nofuse": {"QRUN_FUSE_NORM": "0"}, "rows": {"QRUN_LAYOUT": "rows"},
        "tc16": {"QRUN_LAYOUT": "tc16"}, "fattn": {"QRUN_FUSED_ATTN": "1"}, "fattn2": {"QRUN_FUSED_ATTN": "2"},
        "tc16fattn": {"QRUN_LAYOUT": "tc16", "QRUN_FUSED_ATTN": "1"}, "attn64": {"QRUN_ATTN_SLICE": "64"},
        "il4": {"QRUN_LAYOUT": "il4"}, "il4prefill1024": {"QRUN_LAYOUT": "il4"}, "nomma": {"QRUN_GEMV_MMA": "0"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="qwen2-0.5b,qwen2.5-7b")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--workdir", default="/tmp/qrun-bench")
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--runs", default="graph,eager,prefill1024,hf", help="which runs to make, of "
                    "graph,nopdl (graph without programmatic dependent launch),cap12m (RMSNorm/residual fused only into GEMVs of <= 12 M weights, the old default),nofuse (never fused),rows (canonical int4 layout, not il4 or tc16),tc16 (the tensor-core GEMV for o and down where they have a 16-row tile per SM),il4 and il4prefill1024 (graph and prefill1024 with QRUN_LAYOUT=il4 set explicitly, the default),int4head (embed_tokens and lm_head int4 g128 too, like gpt-fast's int4),fattn (RoPE + cache write + attention + combine in one kernel),fattn2 (the same but the combine kernel kept),tc16fattn (tc16 and fattn),attn64 (attention slices of 64 cache positions),sync (graph, token read before the next step),eager,prefill1024,hf (transformers BF16 on the same weights)")
    ap.add_argument("--tune", action="store_true", help="run `qrun tune` on each model first (its picks are "
                    "stored on disk and used by the runs under the default settings)")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    rows = []
    log = open(os.path.join(a.out, "decode.jsonl"), "a")
    for cfg in a.configs.split(","):
        path = os.path.join(a.workdir, f"{cfg}.stcmp")
        t = time.perf_counter()
        p = qrun("convert", "--random", cfg, "-o", path, "-q")
        print(f"[{cfg}] convert {time.perf_counter() - t:.1f} s rc={p.returncode} {p.stderr.strip()[-300:]}",
              flush=True)
        if p.returncode:
            continue
        if a.tune:  # the decode step's own GEMV picks (qrun tune), stored for every run below
            t = time.perf_counter()
            p = qrun("tune", "--model", path, "-q")
            out = (p.stdout + p.stderr).strip()[-300:]
            print(f"[{cfg}] tune {time.perf_counter() - t:.1f} s rc={p.returncode} {out}", flush=True)
        runs = [("graph", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),
                ("nopdl", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # graph, QRUN_PDL=0
                ("cap12m", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # norms fused up to 12 M weights
                ("nofuse", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # norms never fused
                ("rows", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # canonical int4 layout
                ("attn64", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # 64 positions per slice
                ("tc16", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # tensor-core GEMV for o, down
                ("fattn", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # one-kernel RoPE + attention
                ("fattn2", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # the same, combine kept apart
                ("tc16fattn", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # both
                ("int4head", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # lm_head int4 too
                ("sync", ["--prompt-len", "128", "--gen-len", str(a.gen_len), "--no-run-ahead"]),
                ("eager", ["--prompt-len", "128", "--gen-len", "64", "--no-graph"]),
                ("prefill1024", ["--prompt-len", "1024", "--gen-len", "16"]),
                ("il4", ["--prompt-len", "128", "--gen-len", str(a.gen_len)]),  # no tc16
                ("il4prefill1024", ["--prompt-len", "1024", "--gen-len", "16"]),
                ("hf", ["--prompt-len", "128", "--gen-len", "64", "--compare", "hf"])]
        for label, extra in runs:
            if label not in a.runs.split(","):
                continue
            model = path
            if label == "int4head":  # the same config with embed_tokens / lm_head int4 g128 as well (gpt-fast's
                # int4 handler quantizes every Linear, the output layer included); qrun's default keeps them int8
                model = os.path.join(a.workdir, f"{cfg}-int4head.stcmp")
                p = qrun("convert", "--random", cfg, "--embeddings", "int4", "-o", model, "-q")
                if p.returncode:
                    print(f"[{cfg}] {label}: convert FAILED {p.stderr.strip()[-300:]}", flush=True)
                    continue
            p = qrun("bench", "--model", model, "--device", "cuda", "--json", *extra, env=ENVS.get(label))
            if p.returncode:
                print(f"[{cfg}] {label}: FAILED {p.stderr.strip()[-500:]}", flush=True)
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r.update(config=cfg, run=label)
            log.write(json.dumps(r) + "\n")
            log.flush()
            rows.append(r)
            print(f"[{cfg}] {label}: decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.0f} tok/s, "
                  f"warm-up {r['warmup_s']:.1f} s, "
                  f"load {r['load_s']:.2f} s, {r['achieved_gbps']:.0f} GB/s", flush=True)
    print("\n| config | run | load s | TTFT ms | prefill tok/s | decode tok/s | MB/token | GB/s | % of copy | peak GiB | HF tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hf = f"{r['hf']['decode_tok_s']:.1f}" if "hf" in r else ""
        print(f"| {r['config']} | {r['run']} | {r['load_s']:.2f} | {r['ttft_s'] * 1e3:.1f} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {r['bytes_per_token']['total'] / 1e6:.0f} | {r['achieved_gbps']:.0f} | "
              f"{r['pct_of_copy']:.0f} | {r['peak_gpu_bytes'] / 2**30:.2f} | {hf} |")
    if rows:
        print(f"\ndevice: {rows[0]['device']}, copy bandwidth {rows[0]['copy_gbps']:.0f} GB/s (read + write)")


if __name__ == "__main__":
    main()
