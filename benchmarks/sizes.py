"""Sizes and convert speed of the .stcmp formats on a Hugging Face checkpoint (README "Sizes" table).

    python benchmarks/sizes.py HF_DIR [--json out.json]

For each setting it runs the real converter and reports the file size, bits/param over the quantized
tensors, and convert time / MB/s of BF16 input. For lossless storage it also compresses the same bytes with
zstd alone (no byte planes), so the two columns show what the byte-plane split buys.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import zstandard

from qrun.runtime.convert import ConvertOptions, HFDirSource, convert
from qrun.runtime.stcmp import Reader

RTN = dict(method="rtn", embeddings="keep")  # the storage formats alone: absmax rounding, embeddings kept
SETTINGS = [
    ("lossless (bits 16)", dict(bits=16)),
    ("INT8 g128", dict(bits=8, **RTN)),
    ("INT4 g128 sym", dict(bits=4, scheme="sym", **RTN)),
    ("INT4 g128 asym", dict(bits=4, scheme="asym", **RTN)),
    ("NF4 g64", dict(bits=4, scheme="nf4", block_size=64, **RTN)),
    ("INT4 g128 sym, double-quant scales", dict(bits=4, scheme="sym", double_quant=True, **RTN)),
    ("INT4 g128 sym, embeddings int8", dict(bits=4, scheme="sym", method="rtn", embeddings="int8")),
    ("INT4 g128 sym, embeddings int4", dict(bits=4, scheme="sym", method="rtn", embeddings="int4")),
    ("default: INT4 g128 asym, GPTQ (data-free), embeddings int8", dict()),
]


def zstd_alone(src: HFDirSource, level: int) -> int:
    """Bytes zstd gives on the raw tensor bytes, no byte-plane split, same level and 4 MiB chunks."""
    c = zstandard.ZstdCompressor(level=level)
    total = 0
    for n in src.names():
        raw = src.get(n).contiguous().view(torch.uint8).numpy().tobytes()
        for i in range(0, len(raw), 4 << 20):
            total += len(c.compress(raw[i:i + (4 << 20)]))
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    src = HFDirSource(a.hf_dir)
    bf16_bytes = sum(src.get(n).numel() * 2 for n in src.names())
    params = bf16_bytes // 2
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, kw in SETTINGS:
            out = os.path.join(d, "m.stcmp")
            t0 = time.perf_counter()
            convert(src, out, ConvertOptions(level=a.level, **kw), progress=False)
            dt = time.perf_counter() - t0
            r = Reader(out)
            q = [t for t in r.tensors.values() if t.encoding.startswith(("int", "nf"))]
            qparams = sum(t.shape[0] * t.shape[1] for t in q)
            q_raw = sum(t.raw_bytes for t in q)
            q_stored = sum(t.stored_bytes for t in q)
            rows.append({"setting": label, "file_mb": os.path.getsize(out) / 1e6,
                         "ratio": bf16_bytes / os.path.getsize(out), "seconds": dt,
                         "mb_per_s": bf16_bytes / 1e6 / dt,
                         "quantized_params": qparams,
                         "bits_per_param_raw": 8 * q_raw / qparams if qparams else None,
                         "bits_per_param_stored": 8 * q_stored / qparams if qparams else None,
                         "bits_per_param_model": 8 * os.path.getsize(out) / params})
            print(f"{label}: {rows[-1]['file_mb']:.1f} MB in {dt:.2f} s", file=sys.stderr)
    za = zstd_alone(src, a.level)
    print(f"\nModel: {a.hf_dir} ({params:,} params), BF16 {bf16_bytes / 1e6:.2f} MB; zstd level {a.level}; "
          f"{os.cpu_count()} CPU cores; torch {torch.__version__}")
    print(f"Lossless: zstd alone {za / 1e6:.2f} MB ({bf16_bytes / za:.3f}x) | byte planes + zstd "
          f"{rows[0]['file_mb']:.2f} MB ({rows[0]['ratio']:.3f}x)\n")
    print("| setting | file MB | vs BF16 | bits/param, quantized tensors (raw / stored) | bits/param, whole file | convert s | MB/s of BF16 input |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        bpp = (f"{r['bits_per_param_raw']:.3f} / {r['bits_per_param_stored']:.3f}"
               if r["bits_per_param_raw"] else "–")
        print(f"| {r['setting']} | {r['file_mb']:.2f} | {r['ratio']:.2f}x | {bpp} | {r['bits_per_param_model']:.2f} "
              f"| {r['seconds']:.2f} | {r['mb_per_s']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bf16_bytes": bf16_bytes, "zstd_alone_bytes": za, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
