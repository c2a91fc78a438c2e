"""`qrun convert | quantize | compress | decompress | inspect`: thin layers over qrun.runtime.convert."""
from __future__ import annotations

import json
import sys

from qrun.errors import QRunError


def _quant_args(p, with_scheme=True):
    p.add_argument("--bits", type=int, default=4, choices=[4, 8, 16] if with_scheme else [4, 8],
                   help="4 (default) or 8 quantize the linear weights; 16 keeps every tensor lossless")
    p.add_argument("--block-size", type=int, default=128, choices=[32, 64, 128, 256])
    p.add_argument("--scheme", default=None, choices=["sym", "asym", "nf4"], help="INT4 scheme (default asym)")
    p.add_argument("--double-quant", action="store_true", help="8-bit block scales, one fp32 scale per 256 blocks")
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--embeddings", default="int8", choices=["keep", "int8", "int4"],
                   help="how embed_tokens and an untied lm_head are stored (default int8)")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn", "mse"],
                   help="INT4 rounding: gptq (default; calibrated with --calibrate, else data-free on random "
                        "tokens), rtn = absmax round-to-nearest (instant), mse = data-free clip search")


def _options(a):
    from qrun.runtime.convert import ConvertOptions
    return ConvertOptions(bits=a.bits, block_size=a.block_size, scheme=a.scheme, double_quant=a.double_quant,
                          embeddings=a.embeddings, scale_dtype=a.scale_dtype,
                          level=getattr(a, "level", 3), threads=getattr(a, "threads", None), method=a.method,
                          calib_text=getattr(a, "calibrate", None), calib_tokens=getattr(a, "calib_tokens", None))


def cmd_convert(a) -> int:
    from qrun.runtime.convert import convert, open_source
    if a.random:
        src = open_source("random:" + a.random)
    elif a.input:
        src = open_source(a.input)
    else:
        raise QRunError("give a Hugging Face directory or .gguf file to convert, or --random CONFIG")
    report = convert(src, a.output, _options(a), progress=not a.quiet)
    print(report.table(), file=sys.stderr)
    return 0


def cmd_quantize(a) -> int:
    from qrun.runtime.convert import quantize_safetensors
    q = quantize_safetensors(a.input, a.output, _options(a))
    print(f"quantized {len(q)} tensors -> {a.output}", file=sys.stderr)
    return 0


def cmd_compress(a) -> int:
    from qrun.runtime.convert import compress_safetensors
    report = compress_safetensors(a.input, a.output, level=a.level, threads=a.threads, progress=not a.quiet)
    print(report.table(), file=sys.stderr)
    return 0


def cmd_decompress(a) -> int:
    from qrun.runtime.convert import decompress_stcmp
    n = decompress_stcmp(a.input, a.output)
    print(f"wrote {n} tensors -> {a.output}", file=sys.stderr)
    return 0


def cmd_inspect(a) -> int:
    from qrun.runtime.convert import inspect, summarize
    info = inspect(a.model)
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    cfg = info["config"] or {}
    print(f"{info['path']}: {info['file_bytes'] / 1e6:.2f} MB, format v{info['format_version']}, "
          f"written by qrun {info['qrun_version']}")
    if cfg:
        print(f"model: {cfg.get('model_type')} layers={cfg.get('num_hidden_layers')} hidden={cfg.get('hidden_size')} "
              f"heads={cfg.get('num_attention_heads')}/{cfg.get('num_key_value_heads')} vocab={cfg.get('vocab_size')}")
    print(f"quantization: {json.dumps(info['quantization'])}")
    print(f"tokenizer: {'yes' if info['has_tokenizer'] else 'no'}, chat template: "
          f"{'yes' if info['has_chat_template'] else 'no'}")
    print(f"\n{'encoding':<12}{'tensors':>8}{'params':>14}{'original MB':>13}{'stored MB':>11}{'bits/param':>12}")
    for enc, r in summarize(info["tensors"]).items():
        print(f"{enc:<12}{r['tensors']:>8}{r['params']:>14,}{r['original_bytes'] / 1e6:>13.2f}"
              f"{r['stored_bytes'] / 1e6:>11.2f}{8 * r['stored_bytes'] / r['params']:>12.3f}")
    if a.tensors:
        print(f"\n{'name':<52}{'shape':>16} {'encoding':<10}{'stored':>12}{'ratio':>8}")
        for t in info["tensors"]:
            print(f"{t['name']:<52}{'x'.join(map(str, t['shape'])):>16} {t['encoding']:<10}"
                  f"{t['stored_bytes']:>12,}{t['ratio']:>7.2f}x")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face dir or GGUF -> .stcmp")
    p.add_argument("input", nargs="?", help="Hugging Face model directory or .gguf file")
    p.add_argument("-o", "--output", required=True, help="output .stcmp path")
    _quant_args(p)
    p.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    p.add_argument("--threads", type=int, default=None, help="compression threads (default: all cores)")
    p.add_argument("--random", metavar="CONFIG", help="random weights for a named config "
                   "(qwen2-0.5b, qwen2-1.5b, qwen2.5-7b, llama-3-8b, smollm2-135m) or a config.json path")
    p.add_argument("--calibrate", metavar="TEXT_FILE", help="calibration text for GPTQ-style INT4")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens to use")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="safetensors -> quantized safetensors (packed + <name>.scales)")
    p.add_argument("input")
    p.add_argument("output")
    _quant_args(p, with_scheme=False)
    # the seeds' step 1 is plain block-wise absmax (symmetric), embeddings kept
    p.set_defaults(func=cmd_quantize, scheme="sym", embeddings="keep", method="rtn")

    p = sub.add_parser("compress", help="safetensors -> .stcmp (lossless)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--level", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("decompress", help=".stcmp -> safetensors")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("inspect", help="print what a .stcmp holds")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.set_defaults(func=cmd_inspect)
