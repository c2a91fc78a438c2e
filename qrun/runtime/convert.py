"""Offline conversion: a Hugging Face checkpoint (or a GGUF file) -> one self-contained .stcmp file.

Also the seeds' two-step workflow over plain safetensors files: quantize_safetensors (packed weights plus
`<name>.scales`), compress_safetensors (-> .stcmp) and decompress_stcmp (-> the same safetensors tensors).

A *Source* is anything with: `config` (dict, the config.json), `files` (dict: tokenizer.json text,
tokenizer_config.json, generation_config.json, chat_template), `names()`, `shape(name)`, `dtype(name)` and
`get(name) -> CPU tensor` in Hugging Face layout. HFDirSource reads a checkpoint directory; GGUFSource
(gguf_import.py) a GGUF file; RandomSource (random_model.py) makes random weights for a named config.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from qrun import __version__
from qrun.errors import QRunError
from qrun.quant import DQ_GROUP, QuantizedTensor, quantize
from qrun.runtime.stcmp import DTYPE_NAMES, DTYPES, Reader, Writer, entry_bytes, output_dir, publish

LOSSLESS_ENCODING = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SMALL_TENSOR_BYTES = 1024  # kept as they are: too small for scales to pay
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class ConvertOptions:
    # Defaults chosen by measurement (docs/QUALITY.md): INT4 g128 asym with GPTQ, embeddings int8.
    bits: int = 4  # 4 or 8 quantize the linear weights; 16 keeps every tensor lossless
    block_size: int = 128
    scheme: str | None = None  # sym | asym | nf4 (asym and nf4 need bits=4); None: asym at 4 bits, else sym
    double_quant: bool = False
    embeddings: str = "int8"  # keep | int8 | int4: embed_tokens and an untied lm_head
    scale_dtype: str = "float16"
    level: int = 3  # zstd level
    threads: int | None = None
    # gptq: calibrated on calib_text, or data-free on random token ids without it (INT4 only; INT8 is
    # absmax, already within noise of BF16); rtn: absmax round-to-nearest; mse: data-free clip search.
    method: str = "gptq"
    calib_text: str | None = None
    calib_tokens: int | None = None

    def __post_init__(self):
        if self.bits not in (4, 8, 16):
            raise QRunError(f"--bits must be 4, 8 or 16, not {self.bits}")
        if self.block_size not in (32, 64, 128, 256):
            raise QRunError(f"--block-size must be 32, 64, 128 or 256, not {self.block_size}")
        if self.scheme is None:
            self.scheme = "asym" if self.bits == 4 else "sym"
        if self.scheme not in ("sym", "asym", "nf4"):
            raise QRunError(f"--scheme must be sym, asym or nf4, not {self.scheme}")
        if self.scheme != "sym" and self.bits == 8:
            raise QRunError(f"--scheme {self.scheme} needs --bits 4 (INT8 is symmetric)")
        if self.embeddings not in ("keep", "int8", "int4"):
            raise QRunError(f"--embeddings must be keep, int8 or int4, not {self.embeddings}")
        if self.scale_dtype not in ("float16", "float32"):
            raise QRunError(f"scale dtype must be float16 or float32, not {self.scale_dtype}")
        if not -7 <= self.level <= 22:
            raise QRunError(f"--level must be in [-7, 22], not {self.level}")
        if self.method not in ("gptq", "rtn", "mse"):
            raise QRunError(f"--method must be gptq, rtn or mse, not {self.method}")
        if self.calib_text is not None and (self.method != "gptq" or self.bits != 4):
            raise QRunError("--calibrate needs --bits 4 and --method gptq")

    @property
    def weight_encoding(self) -> str | None:
        if self.bits == 16:
            return None
        if self.bits == 8:
            return "int8_sym"
        return {"sym": "int4_sym", "asym": "int4_asym", "nf4": "nf4"}[self.scheme]

    @property
    def embedding_encoding(self) -> str | None:
        if self.bits == 16 or self.embeddings == "keep":
            return None
        if self.embeddings == "int8":
            return "int8_sym"
        return {"sym": "int4_sym", "asym": "int4_asym", "nf4": "nf4"}[self.scheme]


# ------------------------------------------------------------------------------------------- sources

def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise QRunError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_tokenizer_files(d: str) -> dict[str, Any]:
    """The tokenizer and generation files of a Hugging Face directory, as the header stores them."""
    tok = os.path.join(d, "tokenizer.json")
    if not os.path.isfile(tok):
        raise QRunError(f"{d}: no tokenizer.json (qrun needs a fast tokenizer file)")
    with open(tok, encoding="utf-8") as f:
        files: dict[str, Any] = {"tokenizer.json": f.read()}
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        p = os.path.join(d, name)
        files[name] = _read_json(p) if os.path.isfile(p) else None
    template = (files["tokenizer_config.json"] or {}).get("chat_template")
    for name in ("chat_template.jinja", "chat_template.json"):
        p = os.path.join(d, name)
        if template is None and os.path.isfile(p):
            template = _read_json(p).get("chat_template") if name.endswith(".json") else open(p).read()
    files["chat_template"] = template
    return files


class HFDirSource:
    """A Hugging Face checkpoint directory: config.json, tokenizer.json, safetensors (one file or shards)."""

    def __init__(self, d: str):
        from safetensors import safe_open
        if not os.path.isdir(d):
            raise QRunError(f"{d}: not a directory")
        cfg = os.path.join(d, "config.json")
        if not os.path.isfile(cfg):
            raise QRunError(f"{d}: no config.json")
        self.config = _read_json(cfg)
        self.files = load_tokenizer_files(d)
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.isfile(index):
            shard_of = _read_json(index).get("weight_map", {})
            shards = sorted(set(shard_of.values()))
        else:
            shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        if not shards:
            raise QRunError(f"{d}: no .safetensors weights")
        self._handles, self._where = {}, {}
        for s in shards:
            p = os.path.join(d, s)
            if not os.path.isfile(p):
                raise QRunError(f"{d}: shard {s} named in the index is missing")
            try:
                h = safe_open(p, framework="pt")
            except Exception as e:
                raise QRunError(f"{p}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
            self._handles[s] = h
            for k in h.keys():
                self._where[k] = s
        self._names = list(self._where)
        for n in self._names:
            dt = self.dtype(n)
            if dt not in LOSSLESS_ENCODING:
                raise QRunError(f"tensor {n} has unsupported dtype {dt} (expected bfloat16, float16 or float32)")

    def names(self) -> list[str]:
        return self._names

    def _slice(self, name):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        from safetensors.torch import _TYPES  # str -> torch.dtype
        dt = self._slice(name).get_dtype()
        return _TYPES.get(dt, dt)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def open_source(path: str):
    """An HF directory, a .gguf file, or (bench) `random:<config name or config.json>`."""
    if path.startswith("random:"):
        from qrun.runtime.random_model import RandomSource
        return RandomSource(path[len("random:"):])
    if path.lower().endswith(".gguf"):
        if not os.path.exists(path):
            raise QRunError(f"{path}: no such file")
        from qrun.runtime.gguf_import import GGUFSource
        return GGUFSource(path)
    if not os.path.exists(path):
        raise QRunError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise QRunError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    return HFDirSource(path)


# ------------------------------------------------------------------------------------------- convert

def tensor_encoding(name: str, shape: tuple[int, ...], dtype: torch.dtype, opts: ConvertOptions) -> str | None:
    """The selective policy: which encoding a tensor gets (None = stored losslessly)."""
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    if len(shape) != 2 or nbytes < SMALL_TENSOR_BYTES:
        return None  # norms, biases, tiny tensors
    if name in EMBEDDING_NAMES:
        return opts.embedding_encoding
    return opts.weight_encoding


@dataclass
class ConvertReport:
    """Sizes by class of tensor: original bytes (as read), quantized raw bytes (before zstd), stored bytes."""
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    input_bytes: int = 0
    output_path: str = ""
    output_bytes: int = 0

    def add(self, cls: str, params: int, original: int, raw: int, stored: int) -> None:
        r = self.rows.setdefault(cls, {"params": 0, "original": 0, "raw": 0, "stored": 0})
        r["params"] += params
        r["original"] += original
        r["raw"] += raw
        r["stored"] += stored

    def total(self) -> dict[str, float]:
        t = {"params": 0, "original": 0, "raw": 0, "stored": 0}
        for r in self.rows.values():
            for k in t:
                t[k] += r[k]
        return t

    def table(self) -> str:
        lines = [f"{'tensors':<22}{'params':>14}{'original MB':>13}{'quantized MB':>14}{'stored MB':>11}"
                 f"{'ratio':>8}{'bits/param':>12}"]
        for cls, r in list(self.rows.items()) + [("total", self.total())]:
            ratio = r["original"] / r["stored"] if r["stored"] else float("nan")
            bpp = 8 * r["stored"] / r["params"] if r["params"] else float("nan")
            lines.append(f"{cls:<22}{r['params']:>14,}{r['original'] / 1e6:>13.2f}{r['raw'] / 1e6:>14.2f}"
                         f"{r['stored'] / 1e6:>11.2f}{ratio:>7.2f}x{bpp:>12.3f}")
        mbps = self.input_bytes / 1e6 / self.seconds if self.seconds else float("nan")
        lines.append(f"file {self.output_path}: {self.output_bytes / 1e6:.2f} MB, "
                     f"converted in {self.seconds:.1f} s ({mbps:.0f} MB/s of input)")
        return "\n".join(lines)


def quantize_weight(name: str, w: torch.Tensor, encoding: str, opts: ConvertOptions) -> QuantizedTensor:
    scale_dtype = torch.float16 if opts.scale_dtype == "float16" else torch.float32
    clip = None
    if opts.method == "mse":
        from qrun.runtime.calibrate import mse_clip_ratio
        clip = mse_clip_ratio(w.float(), encoding, opts.block_size)
    return quantize(w, encoding, opts.block_size, scale_dtype, opts.double_quant, name=name, clip_ratio=clip)


def quant_header(opts: ConvertOptions, calibrated: bool = False) -> dict[str, Any]:
    h = {"bits": opts.bits, "scheme": opts.scheme if opts.bits == 4 else "sym",
         "block_size": opts.block_size, "scale_dtype": opts.scale_dtype,
         "double_quant": opts.double_quant, "double_quant_group": DQ_GROUP if opts.double_quant else None,
         "embeddings": opts.embeddings if opts.bits != 16 else "keep",
         "method": opts.method if opts.bits == 4 else "rtn"}
    if calibrated:  # what the GPTQ pass saw (no scales are folded: the stored layout is the plain one)
        from qrun.runtime import calibrate as c
        h["calibration"] = {
            "text": os.path.basename(opts.calib_text) if opts.calib_text else "random token ids (data-free)",
            "tokens": opts.calib_tokens or (c.DEFAULT_CALIB_TOKENS if opts.calib_text else c.DATA_FREE_TOKENS),
            "ctx": c.CALIB_CTX, "act_order": c.ACT_ORDER, "damp": c.DAMP}
    return h


def convert(src, out_path: str, opts: ConvertOptions | None = None, progress: bool = True,
            quantized: dict[str, QuantizedTensor] | None = None) -> ConvertReport:
    """Convert a Source (or a path open_source understands) into a .stcmp file, atomically.

    `quantized` holds precomputed quantizations (from calibration) that replace the converter's own for
    those tensor names; they are stored in exactly the same format.
    """
    from tqdm import tqdm
    opts = opts or ConvertOptions()
    output_dir(out_path)  # before reading or calibrating anything
    if isinstance(src, (str, os.PathLike)):
        src = open_source(os.fspath(src))
    calibrated = quantized is not None
    if quantized is None and opts.method == "gptq" and opts.bits == 4 and not getattr(src, "random", False):
        from qrun.runtime.calibrate import calibrate
        quantized = calibrate(src, opts.calib_text, opts, calib_tokens=opts.calib_tokens, progress=progress)
        calibrated = True
    t0 = time.perf_counter()
    report = ConvertReport(output_path=os.fspath(out_path))
    names = list(src.names())
    total_bytes = sum(torch.Size(src.shape(n)).numel() * torch.empty(0, dtype=src.dtype(n)).element_size()
                      for n in names)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress,
               leave=False)
    try:
        with Writer(out_path, level=opts.level, threads=opts.threads) as w:
            for name in names:
                enc = tensor_encoding(name, tuple(src.shape(name)), src.dtype(name), opts)
                pre = (quantized or {}).get(name)
                if enc is not None and getattr(src, "random", False) and not opts.double_quant:
                    pre = src.quantized_random(name, enc, opts.block_size)  # random codes, no float pass
                    t = torch.empty(src.shape(name), dtype=src.dtype(name), device="meta")
                else:
                    t = src.get(name)
                if t.dtype not in LOSSLESS_ENCODING:
                    raise QRunError(f"tensor {name} has unsupported dtype {t.dtype}")
                nbytes = t.numel() * t.element_size()
                if pre is not None or enc is not None:
                    qt = pre or quantize_weight(name, t, enc, opts)
                    meta = {"block_size": qt.block_size}
                    entry = w.add(name, qt.parts, qt.encoding, list(qt.shape), DTYPE_NAMES[t.dtype], **meta)
                    cls = f"{qt.encoding} g{qt.block_size}"
                else:
                    entry = w.add(name, {"data": t}, LOSSLESS_ENCODING[t.dtype], list(t.shape),
                                  DTYPE_NAMES[t.dtype])
                    cls = "kept " + LOSSLESS_ENCODING[t.dtype]
                report.add(cls, t.numel(), nbytes, *entry_bytes(entry))
                report.input_bytes += nbytes
                bar.update(nbytes)
                del t
            header = {"qrun_version": __version__, "config": src.config, "files": src.files,
                      "quantization": quant_header(opts, calibrated)}
            w.close(header)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.output_bytes = os.path.getsize(out_path)
    return report


# ----------------------------------------------------------------------- the two-step safetensors path

QUANT_META_KEY = "qrun.quant"  # safetensors metadata: JSON {name: {encoding, shape, block_size, dtype}}
PART_SUFFIXES = ("scales", "scales_q", "scales_meta", "zeros")


def _safetensors_open(path: str):
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise QRunError(f"{path}: no such file")
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise QRunError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def _save_safetensors_atomic(tensors: dict[str, torch.Tensor], out: str, metadata: dict[str, str]) -> None:
    import tempfile
    from safetensors.torch import save_file
    fd, tmp = tempfile.mkstemp(prefix=".qrun-", suffix=".tmp", dir=output_dir(out))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        publish(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def quantize_safetensors(inp: str, out: str, opts: ConvertOptions) -> dict[str, Any]:
    """IN.safetensors -> OUT.safetensors with packed weights under their own names, plus `<name>.scales`
    (and `<name>.zeros`, ...). The scheme per tensor is in the metadata under "qrun.quant"."""
    output_dir(out)
    if opts.method == "gptq":
        raise QRunError("qrun quantize rounds tensor by tensor (--method rtn or mse); GPTQ needs the whole "
                        "model: use qrun convert")
    h = _safetensors_open(inp)
    tensors: dict[str, torch.Tensor] = {}
    qmeta: dict[str, Any] = {}
    for name in h.keys():
        t = h.get_tensor(name)
        if t.dtype not in LOSSLESS_ENCODING:
            raise QRunError(f"tensor {name} has unsupported dtype {t.dtype}")
        enc = tensor_encoding(name, tuple(t.shape), t.dtype, opts)
        if enc is None:
            tensors[name] = t
            continue
        qt = quantize_weight(name, t, enc, opts)
        for part, v in qt.parts.items():
            tensors[name if part == "qweight" else f"{name}.{part}"] = v
        qmeta[name] = {"encoding": qt.encoding, "shape": list(qt.shape), "block_size": qt.block_size,
                       "dtype": DTYPE_NAMES[t.dtype]}
    meta = dict(h.metadata() or {})
    meta[QUANT_META_KEY] = json.dumps(qmeta)
    _save_safetensors_atomic(tensors, out, meta)
    return qmeta


def compress_safetensors(inp: str, out: str, level: int = 3, threads: int | None = None,
                         progress: bool = True) -> ConvertReport:
    """Any safetensors file (plain, or written by quantize_safetensors) -> .stcmp, losslessly."""
    from tqdm import tqdm
    output_dir(out)
    t0 = time.perf_counter()
    h = _safetensors_open(inp)
    meta = dict(h.metadata() or {})
    qmeta = json.loads(meta.get(QUANT_META_KEY, "{}"))
    names = list(h.keys())
    part_names = {f"{n}.{s}" for n in qmeta for s in PART_SUFFIXES}
    report = ConvertReport(output_path=out)
    with Writer(out, level=level, threads=threads) as w:
        for name in tqdm(names, desc="compress", disable=not progress, leave=False):
            if name in part_names:
                continue
            if name in qmeta:
                q = qmeta[name]
                parts = {"qweight": h.get_tensor(name)}
                for s in PART_SUFFIXES:
                    if f"{name}.{s}" in names:
                        parts[s] = h.get_tensor(f"{name}.{s}")
                entry = w.add(name, parts, q["encoding"], q["shape"], q["dtype"], block_size=q["block_size"])
                cls = q["encoding"]
                params = q["shape"][0] * q["shape"][1]
                original = params * torch.empty(0, dtype=DTYPES[q["dtype"]]).element_size()
            else:
                t = h.get_tensor(name)
                enc = LOSSLESS_ENCODING.get(t.dtype, str(t.dtype).replace("torch.", ""))
                entry = w.add(name, {"data": t}, enc, list(t.shape), DTYPE_NAMES[t.dtype])
                cls, params, original = "kept " + enc, t.numel(), t.numel() * t.element_size()
            raw, stored = entry_bytes(entry)
            report.add(cls, params, original, raw, stored)
            report.input_bytes += raw
        w.close({"qrun_version": __version__, "config": None, "files": {},
                 "safetensors_metadata": {k: v for k, v in meta.items() if k != QUANT_META_KEY}})
    report.seconds = time.perf_counter() - t0
    report.output_bytes = os.path.getsize(out)
    return report


def decompress_stcmp(inp: str, out: str, threads: int = 4) -> int:
    """.stcmp -> safetensors holding exactly the stored tensors (quantized ones as packed + parts)."""
    output_dir(out)
    r = Reader(inp)
    tensors: dict[str, torch.Tensor] = {}
    qmeta: dict[str, Any] = {}
    for name, info in r.tensors.items():
        parts = r.read_parts(name, threads)
        if "data" in parts:
            tensors[name] = parts["data"]
            continue
        for part, v in parts.items():
            tensors[name if part == "qweight" else f"{name}.{part}"] = v
        qmeta[name] = {"encoding": info.encoding, "shape": info.shape,
                       "block_size": info.entry["block_size"], "dtype": info.dtype}
    meta = dict(r.header.get("safetensors_metadata") or {})
    if qmeta:
        meta[QUANT_META_KEY] = json.dumps(qmeta)
    _save_safetensors_atomic(tensors, out, meta)
    return len(tensors)


# --------------------------------------------------------------------------------------------- inspect

def inspect(path: str) -> dict[str, Any]:
    """What a .stcmp holds: config summary, quantization, and per-tensor sizes."""
    r = Reader(path)
    tensors = []
    for name, info in r.tensors.items():
        params = 1
        for s in info.shape:
            params *= s
        orig = params * torch.empty(0, dtype=DTYPES[info.dtype]).element_size()
        tensors.append({"name": name, "shape": info.shape, "dtype": info.dtype, "encoding": info.encoding,
                        "block_size": info.entry.get("block_size"), "params": params,
                        "original_bytes": orig, "raw_bytes": info.raw_bytes, "stored_bytes": info.stored_bytes,
                        "ratio": orig / info.stored_bytes if info.stored_bytes else None,
                        "bits_per_param": 8 * info.stored_bytes / params if params else None})
    files = r.files()
    return {"path": path, "file_bytes": r.size, "format_version": r.header.get("format_version"),
            "qrun_version": r.header.get("qrun_version"), "config": r.config,
            "quantization": r.header.get("quantization"),
            "has_tokenizer": bool(files.get("tokenizer.json")),
            "has_chat_template": bool(files.get("chat_template")), "tensors": tensors}


def summarize(tensors: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per-encoding totals of inspect()'s tensor rows."""
    out: dict[str, dict[str, int]] = {}
    for t in tensors:
        r = out.setdefault(t["encoding"], {"tensors": 0, "params": 0, "original_bytes": 0, "stored_bytes": 0})
        r["tensors"] += 1
        r["params"] += t["params"]
        r["original_bytes"] += t["original_bytes"]
        r["stored_bytes"] += t["stored_bytes"]
    return out
