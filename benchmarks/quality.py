"""Size versus perplexity for every quantization setting: the table in docs/QUALITY.md and the README.

    python benchmarks/quality.py --model SmolLM2-135M-Instruct.Q4_1.gguf [--max-tokens 4096] [--calib-tokens 4096]

For each row: convert the model (qrun.runtime.convert, with the data-free clip search or GPTQ calibration
where the row says so), load it, and measure perplexity on benchmarks/data/heldout.txt (calibration reads
benchmarks/data/calib.txt, a disjoint text). Results are cached per row in --results (JSON), so an interrupted
run resumes; --rows picks rows by name. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# name: (ConvertOptions fields, how: rtn | mse | gptq (calibrated on calib.txt) | gptq-rand (data-free: GPTQ on
# random token ids))
ROWS = {
    "bf16": (dict(bits=16), "rtn"),
    "int8-g128": (dict(bits=8, block_size=128), "rtn"),
    "int4-g128-sym-rtn": (dict(bits=4, block_size=128, scheme="sym"), "rtn"),
    "int4-g128-asym-rtn": (dict(bits=4, block_size=128, scheme="asym"), "rtn"),
    "nf4-g64-rtn": (dict(bits=4, block_size=64, scheme="nf4"), "rtn"),
    "int4-g128-sym-mse": (dict(bits=4, block_size=128, scheme="sym"), "mse"),
    "int4-g128-asym-mse": (dict(bits=4, block_size=128, scheme="asym"), "mse"),
    "int4-g128-sym-gptq-rand": (dict(bits=4, block_size=128, scheme="sym"), "gptq-rand"),
    "int4-g128-asym-gptq-rand": (dict(bits=4, block_size=128, scheme="asym"), "gptq-rand"),
    "int4-g128-sym-gptq": (dict(bits=4, block_size=128, scheme="sym"), "gptq"),
    "int4-g128-asym-gptq": (dict(bits=4, block_size=128, scheme="asym"), "gptq"),
    "int4-g64-asym-gptq": (dict(bits=4, block_size=64, scheme="asym"), "gptq"),
    "int4-g128-asym-gptq-emb8": (dict(bits=4, block_size=128, scheme="asym", embeddings="int8"), "gptq"),
    "int4-g128-asym-gptq-emb4": (dict(bits=4, block_size=128, scheme="asym", embeddings="int4"), "gptq"),
    "int4-g128-asym-gptq-rand-emb8": (dict(bits=4, block_size=128, scheme="asym", embeddings="int8"), "gptq-rand"),
    "int4-g128-asym-mse-emb8": (dict(bits=4, block_size=128, scheme="asym", embeddings="int8"), "mse"),
    "int4-g128-asym-mse-emb4": (dict(bits=4, block_size=128, scheme="asym", embeddings="int4"), "mse"),
}


def run_row(name: str, a) -> dict:
    import torch

    from qrun.runtime.convert import ConvertOptions, convert, open_source
    from qrun.runtime.evaluate import perplexity, read_text
    import qrun

    fields, how = ROWS[name]
    fields = {"embeddings": "keep", **fields}  # rows say when they quantize embeddings
    # gptq rows calibrate on calib.txt, gptq-rand rows on random token ids (convert() runs the calibration)
    text = os.path.join(HERE, "data", "calib.txt") if how == "gptq" else None
    opts = ConvertOptions(**fields, method="gptq" if how.startswith("gptq") else how, calib_text=text,
                          calib_tokens=a.calib_tokens)
    src = open_source(a.model)
    t0 = time.perf_counter()
    out = os.path.join(a.workdir, f"{name}.stcmp")
    report = convert(src, out, opts, progress=True)
    convert_s = time.perf_counter() - t0
    total = report.total()
    linear = {"params": 0, "stored": 0}
    for cls, r in report.rows.items():
        if not cls.startswith("kept"):
            linear["params"] += r["params"]
            linear["stored"] += r["stored"]
    llm = qrun.load(out, device=a.device, max_seq_len=a.ctx, progress=False)
    r = perplexity(llm, read_text(os.path.join(HERE, "data", "heldout.txt")), ctx=a.ctx, max_tokens=a.max_tokens)
    del llm
    os.unlink(out)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"row": name, "method": how, **fields, "perplexity": r["perplexity"], "tokens": r["tokens"],
            "file_mb": report.output_bytes / 1e6,
            "bits_per_param": 8 * total["stored"] / total["params"],
            "quantized_bits_per_param": 8 * linear["stored"] / linear["params"] if linear["params"] else 16.0,
            "convert_s": convert_s}


def table(results: dict) -> str:
    base = results.get("bf16", {}).get("perplexity")
    lines = ["| setting | method | embeddings | perplexity | vs BF16 | bits/param (file) | bits/param (quantized tensors) | file MB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ROWS:
        r = results.get(name)
        if not r:
            continue
        d = f"{100 * (r['perplexity'] / base - 1):+.1f}%" if base else "n/a"
        lines.append(f"| {name} | {r['method']} | {r.get('embeddings', 'keep')} | {r['perplexity']:.3f} | {d} | "
                     f"{r['bits_per_param']:.2f} | {r['quantized_bits_per_param']:.2f} | {r['file_mb']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF directory or .gguf file")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--results", default=os.path.join(HERE, "quality_results.json"))
    p.add_argument("--redo", action="store_true", help="measure rows again even if cached")
    a = p.parse_args()
    results = {}
    if os.path.exists(a.results):
        with open(a.results) as f:
            results = json.load(f)
    for name in a.rows:
        same = results.get(name, {}).get("settings") == [a.ctx, a.max_tokens, a.calib_tokens]
        if same and not a.redo:
            continue
        r = run_row(name, a)
        r["settings"] = [a.ctx, a.max_tokens, a.calib_tokens]
        results[name] = r
        print(f"{name}: perplexity {r['perplexity']:.3f}, {r['bits_per_param']:.2f} bits/param", file=sys.stderr)
        with open(a.results, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
