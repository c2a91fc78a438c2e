"""Load a .stcmp file into a ready-to-generate `LLM`: the one place that knows both the file and the model.

    llm = qrun.load("model.stcmp", device="cuda", max_seq_len=4096)

1. The header's config.json gives ModelArgs; the Transformer is built on the meta device (no memory).
2. Tensors stream in, grouped by the module they fill: a pool of threads decompresses chunks into host
   buffers (pinned when the target is a GPU) a bounded number of bytes ahead, while the main thread issues
   non-blocking copies of finished parts to the device; so decompression overlaps the transfer and host
   memory holds at most `prefetch_bytes` (or one part, if larger) of the model at a time.
3. Each module group becomes a layer chosen by the tensors' encodings: q/k/v fused into one QuantLinear
   (or Linear) when their encodings and block sizes agree, gate/up likewise behind the SiLU*mul kernel;
   otherwise they stay separate (Concat / SiluMul). Double-quantized scales are expanded to fp16 here.
4. On the CPU, quantized weights are dequantized once at load into the compute dtype (float32 by default)
   unless dequantize=False: CPU matmuls on dense weights are far faster than dequantizing every call, at
   the cost of 4 bytes per parameter of RAM.
"""
from __future__ import annotations

import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from qrun.errors import QRunError
from qrun.kernels.layout import can_interleave4, can_tc16, interleave4, to_tc16
from qrun.models import ModelArgs, Transformer
from qrun.models.linear import Concat, Embedding, FusedSiluMul, Linear, QuantEmbedding, QuantLinear, SiluMul
from qrun.quant import ENCODINGS, dequantize_parts, effective_scales
from qrun.runtime.generate import LLM
from qrun.runtime.stcmp import DTYPES, Reader
from qrun.runtime.tokenizer import Tokenizer

DEFAULT_MAX_SEQ = 4096
PREFETCH_BYTES = 256 << 20
LOSSLESS = ("bf16", "fp16", "fp32")
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------- the plan

@dataclass
class Group:
    """One module of the model and the file tensors that fill it."""
    target: str  # module path in Transformer, e.g. "layers.0.self_attn.qkv_proj"
    kind: str  # "linear" | "silu_mul" | "embedding" | "norm"
    weights: list[str]  # file tensor names, in output-row order
    biases: list[str | None]

    @property
    def names(self) -> list[str]:
        return self.weights + [b for b in self.biases if b]


def plan(args: ModelArgs, names: set[str]) -> list[Group]:
    """The groups to load, in model order; raises a clear error for a missing tensor."""
    groups = [Group("embed_tokens", "embedding", ["model.embed_tokens.weight"], [None])]
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        qkv_b = [a + f"{x}_proj.bias" if a + f"{x}_proj.bias" in names else None for x in "qkv"]
        groups += [
            Group(f"layers.{i}.input_layernorm", "norm", [p + "input_layernorm.weight"], [None]),
            Group(f"layers.{i}.self_attn.qkv_proj", "linear", [a + f"{x}_proj.weight" for x in "qkv"], qkv_b),
            Group(f"layers.{i}.self_attn.o_proj", "linear", [a + "o_proj.weight"],
                  [a + "o_proj.bias" if a + "o_proj.bias" in names else None]),
            Group(f"layers.{i}.post_attention_layernorm", "norm", [p + "post_attention_layernorm.weight"], [None]),
            Group(f"layers.{i}.mlp.gate_up_proj", "silu_mul", [m + "gate_proj.weight", m + "up_proj.weight"],
                  [None, None]),
            Group(f"layers.{i}.mlp.down_proj", "linear", [m + "down_proj.weight"], [None]),
        ]
    groups.append(Group("norm", "norm", ["model.norm.weight"], [None]))
    if "lm_head.weight" in names:
        groups.append(Group("lm_head", "linear", ["lm_head.weight"], [None]))
    elif not args.tie_embeddings:
        raise QRunError("the file has no lm_head.weight and its config does not tie the embeddings")
    for g in groups:
        for n in g.names:
            if n not in names:
                raise QRunError(f"the file is missing tensor {n!r}")
    return groups


# ------------------------------------------------------------------------------------------ streaming

class _Prefetcher:
    """Yields (tensor, part, host tensor) in the given order while a thread pool decompresses the chunks of
    the parts ahead into fresh host buffers, at most `budget` raw bytes (or one part) in flight."""

    def __init__(self, reader: Reader, items: list[tuple[str, str]], pin: bool, threads: int, budget: int):
        self.reader, self.items, self.pin, self.threads, self.budget = reader, items, pin, threads, budget

    def __iter__(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        r = self.reader
        pending: deque = deque()
        todo = iter(self.items)
        inflight = 0
        done = False

        def fill(view: np.ndarray, name: str, part: str, i: int, start: int, n: int) -> None:
            view[start:start + n] = r.read_chunk(name, part, i)

        with ThreadPoolExecutor(self.threads) as pool:
            try:
                while True:
                    while not done and (not pending or inflight < self.budget):
                        item = next(todo, None)
                        if item is None:
                            done = True
                            break
                        name, part = item
                        p = r.info(name).entry["parts"][part]
                        raw = sum(c[2] for c in p["chunks"])
                        buf = torch.empty(raw, dtype=torch.uint8, pin_memory=self.pin)
                        view, start, futs = buf.numpy(), 0, []
                        for i, c in enumerate(p["chunks"]):
                            futs.append(pool.submit(fill, view, name, part, i, start, c[2]))
                            start += c[2]
                        pending.append((name, part, p, buf, futs, raw))
                        inflight += raw
                    if not pending:
                        return
                    name, part, p, buf, futs, raw = pending.popleft()
                    for f in futs:
                        f.result()
                    inflight -= raw
                    yield name, part, buf.view(DTYPES[p["dtype"]]).reshape(p["shape"])
            finally:
                for *_, futs, _ in pending:
                    for f in futs:
                        f.cancel()


# ---------------------------------------------------------------------------------------- building

class _Builder:
    """Turns the device tensors of one group into the module that replaces the meta placeholder."""

    def __init__(self, reader: Reader, dtype: torch.dtype, dequantize: bool):
        self.reader, self.dtype, self.dequantize = reader, dtype, dequantize

    def _quant(self, name: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored parts -> kernel inputs: qweight, scales (fp16/fp32, double quant expanded), zeros."""
        if "scales" in parts:
            s = parts["scales"]
        else:
            s = effective_scales(parts)
            s16 = s.to(torch.float16)
            s = s16 if torch.isfinite(s16).all() else s  # keep fp32 if fp16 would overflow
        out = {"qweight": parts["qweight"], "scales": s}
        if "zeros" in parts:
            out["zeros"] = parts["zeros"]
        return out

    def dense(self, name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        t = self.reader.info(name)
        if t.encoding in LOSSLESS:
            return parts["data"].to(self.dtype)
        return dequantize_parts(t.encoding, self._quant(name, parts), tuple(t.shape), t.entry["block_size"],
                                self.dtype)

    def _is_quant(self, name: str) -> bool:
        enc = self.reader.info(name).encoding
        if enc not in LOSSLESS and enc not in ENCODINGS:
            raise QRunError(f"tensor {name!r} has an unknown encoding {enc!r} (a newer qrun wrote it?)")
        return enc not in LOSSLESS and not self.dequantize

    def linear(self, names: list[str], biases: list[str | None], tensors: dict[str, Any],
               row_groups: int = 4, tensor_cores: bool = False) -> torch.nn.Module:
        """One weight or several stacked along the output rows (q/k/v, gate/up) -> one module if possible.
        On CUDA, int4 weights get a layout for the decode GEMV (qrun/kernels/layout.py): "il4" where the row count
        is a multiple of `row_groups` (the default, QRUN_LAYOUT=il4). QRUN_LAYOUT=tc16 gives "tc16" (the
        tensor-core GEMV) where `tensor_cores` (projections with no RMSNorm to fuse in front: that GEMV does
        not fuse it) and the shape allows, il4 elsewhere. It decodes Qwen2.5-7B 3% faster (447 against 434-436
        tok/s on the H100), but two of its prefill GEMM configs gave wrong results there (left out since) and
        the rest have been checked once, so it stays opt-in (PERF.md round 7).
        QRUN_LAYOUT=rows keeps the canonical layout."""
        infos = [self.reader.info(n) for n in names]
        k = infos[0].shape[1]
        quant = [self._is_quant(n) for n in names]
        if len(names) > 1 and any(quant) and not (
                all(quant) and len({(i.encoding, i.entry["block_size"]) for i in infos}) == 1):
            # Mixed encodings cannot share one weight: one module each, outputs concatenated.
            return Concat(*(self.linear([n], [b], tensors) for n, b in zip(names, biases)))
        bias = None
        if any(biases):
            dev = next(iter(tensors[names[0]].values())).device
            bias = torch.cat([tensors[b]["data"].to(self.dtype) if b else
                              torch.zeros(i.shape[0], dtype=self.dtype, device=dev)
                              for b, i in zip(biases, infos)])
        if not any(quant):
            w = torch.cat([self.dense(n, tensors[n]) for n in names]) if len(names) > 1 else \
                self.dense(names[0], tensors[names[0]])
            return Linear(k, w.shape[0], weight=w, bias_tensor=bias)
        qs = [self._quant(n, tensors[n]) for n in names]
        if len(qs) == 1:
            q = qs[0]
        else:  # stack along output rows; every block lies within one row, so rows concatenate freely
            sdt = torch.float32 if any(x["scales"].dtype == torch.float32 for x in qs) else torch.float16
            q = {key: torch.cat([x[key].to(sdt) if key == "scales" else x[key] for x in qs]) for key in qs[0]}
        layout = "rows"
        choice = os.environ.get("QRUN_LAYOUT", "il4")
        if choice not in ("il4", "tc16", "rows"):
            raise QRunError(f"QRUN_LAYOUT must be il4, tc16 or rows, not {choice!r}")
        bs = infos[0].entry["block_size"]
        # tc16 needs a 16-row tile per SM at least: its programs are tiles (Qwen2-0.5B's o and down have 56 on
        # 132 SMs, and ran 1.0-1.35x slower than il4 on the H100; PERF.md round 5)
        if (q["qweight"].is_cuda and choice == "tc16" and tensor_cores
                and can_tc16(infos[0].encoding, q["qweight"], bs, 16 * row_groups // 4)
                and q["qweight"].shape[0] // 16 >= torch.cuda.get_device_properties(q["qweight"].device)
                .multi_processor_count):
            q["qweight"], q["scales"], q["zeros"] = to_tc16(q["qweight"], q["scales"], q.get("zeros"))
            layout = "tc16"
        elif (q["qweight"].is_cuda and choice in ("il4", "tc16")
                and can_interleave4(infos[0].encoding, q["qweight"]) and q["qweight"].shape[0] % row_groups == 0):
            q["qweight"], q["scales"], q["zeros"] = interleave4(q["qweight"], q["scales"], q.get("zeros"))
            layout = "il4"
        return QuantLinear(q["qweight"], q["scales"], q.get("zeros"), bias, encoding=infos[0].encoding,
                           block_size=infos[0].entry["block_size"], in_features=k, layout=layout)

    def silu_mul(self, names, tensors) -> torch.nn.Module:
        fused = self.linear(names, [None, None], tensors, row_groups=8)  # gate and up: 4-row groups each
        if isinstance(fused, Concat):
            return SiluMul(*fused.parts)
        return FusedSiluMul(fused)

    def embedding(self, name: str, tensors) -> torch.nn.Module:
        info = self.reader.info(name)
        v, d = info.shape
        if self._is_quant(name):
            q = self._quant(name, tensors[name])
            return QuantEmbedding(q["qweight"], q["scales"], q.get("zeros"), encoding=info.encoding,
                                  block_size=info.entry["block_size"], dim=d, dtype=self.dtype)
        return Embedding(v, d, weight=self.dense(name, tensors[name]))


def _set(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# --------------------------------------------------------------------------------------------- load

def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QRunError(f"unknown device {device!r} (use cpu or cuda)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QRunError("device cuda was asked for, but no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QRunError(f"device {dev} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise QRunError(f"unsupported device {device!r} (use cpu or cuda)")
    return dev


def eos_ids(header: dict[str, Any], tokenizer: Tokenizer | None) -> set[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer's eos_token (any may be a list)."""
    ids: set[int] = set()
    gen = (header.get("files") or {}).get("generation_config.json") or {}
    for src in (gen.get("eos_token_id"), (header.get("config") or {}).get("eos_token_id")):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(x for x in src if isinstance(x, int))
    tid = tokenizer and tokenizer.token_id(tokenizer.special_tokens.get("eos_token"))
    if tid is not None:
        ids.add(tid)
    return ids


KV_WORKSPACE = 512 << 20  # GPU bytes kept free beside the KV cache: activations, logits, graph pool


def check_kv_cache_fits(args: ModelArgs, max_seq_len: int, dtype: torch.dtype, free_bytes: int,
                        batch: int = 1) -> None:
    """Raise a QRunError naming the largest max_seq_len that fits when the KV cache (2 x layers x batch x
    kv_heads x max_seq_len x head_dim, in `dtype`) plus a small workspace exceeds the free GPU memory."""
    per_pos = 2 * args.n_layers * batch * args.n_kv_heads * args.head_dim * torch.empty(0, dtype=dtype).element_size()
    need = per_pos * max_seq_len
    if need + KV_WORKSPACE <= free_bytes:
        return
    largest = max(0, (free_bytes - KV_WORKSPACE) // per_pos)
    hint = f"use --max-seq-len {largest} or less" if largest >= 2 else "the weights leave no room for it"
    raise QRunError(f"the KV cache for max_seq_len {max_seq_len} needs {need / 2**30:.2f} GiB but only "
                    f"{free_bytes / 2**30:.2f} GiB of GPU memory is free after the weights: {hint}")


def load(path: str | os.PathLike, device: str | torch.device | None = "cpu", max_seq_len: int | None = None,
         dtype: str | torch.dtype | None = None, *, dequantize: bool | None = None, progress: bool = True,
         threads: int | None = None, prefetch_bytes: int = PREFETCH_BYTES,
         require_tokenizer: bool = False, graph: bool = True, max_batch: int = 1) -> LLM:
    """Load a .stcmp model. device: "cpu" | "cuda" | "cuda:N" | None (cuda if available).
    max_seq_len: KV cache length (default min(max_position_embeddings, 4096)).
    dtype: compute dtype (default bfloat16 on CUDA, float32 on the CPU).
    dequantize: expand quantized weights to dense at load (default: on the CPU only).
    A file without a tokenizer (random-weight benchmark models) loads with .tokenizer None, and the text
    methods say so; require_tokenizer=True refuses it before any weight is read.
    graph: on CUDA, replay the decode step as a captured CUDA graph (default on).
    max_batch: sequences the KV cache holds (generate() runs one; qrun bench --batch runs several)."""
    dev = resolve_device(device)
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise QRunError(f"unknown dtype {dtype!r} (use bfloat16, float16 or float32)")
        dtype = _DTYPE_NAMES[dtype]
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    dequantize = (dev.type == "cpu") if dequantize is None else dequantize

    reader = Reader(path)
    header = reader.header
    cfg = header.get("config")
    if not isinstance(cfg, dict):
        raise QRunError(f"{reader.path}: the file holds no model config (a bare tensor archive?)")
    args = ModelArgs.from_config(cfg)
    files = header.get("files") or {}
    has_tok = bool(files.get("tokenizer.json"))
    tokenizer = Tokenizer(files, source=reader.path) if has_tok or require_tokenizer else None

    names = set(reader.tensors)
    args.qkv_bias = "model.layers.0.self_attn.q_proj.bias" in names  # the checkpoint decides
    args.o_bias = "model.layers.0.self_attn.o_proj.bias" in names
    limit = args.max_position_embeddings
    if max_seq_len is None:
        max_seq_len = min(limit, DEFAULT_MAX_SEQ)
    if max_batch < 1:
        raise QRunError(f"max_batch must be at least 1, not {max_batch}")
    if max_seq_len < 2:
        raise QRunError(f"max_seq_len must be at least 2, not {max_seq_len}")
    if max_seq_len > limit:
        raise QRunError(f"max_seq_len {max_seq_len} is beyond the model's max_position_embeddings {limit}")
    groups = plan(args, names)

    with torch.device("meta"):
        model = Transformer(args)
    model.eval()

    builder = _Builder(reader, dtype, dequantize)
    group_of = {n: g for g in groups for n in g.names}  # every file tensor fills exactly one module
    tensors_left = {g.target: len(g.names) for g in groups}
    parts_left = {n: len(reader.info(n).entry["parts"]) for n in group_of}
    items = [(n, part) for n in group_of for part in reader.info(n).entry["parts"]]  # in model order
    tensors: dict[str, dict[str, torch.Tensor]] = {}  # arrived parts of modules not yet built

    from tqdm import tqdm
    total = sum(reader.info(n).raw_bytes for n in group_of)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", file=sys.stderr, disable=not progress,
               leave=False)
    pin = dev.type == "cuda"
    threads = threads or min(8, os.cpu_count() or 1)
    try:
        for name, part, host in _Prefetcher(reader, items, pin, threads, prefetch_bytes):
            # Non-blocking from pinned memory: the copy runs while the pool decompresses the next parts.
            tensors.setdefault(name, {})[part] = host.to(dev, non_blocking=True) if pin else host
            bar.update(host.numel() * host.element_size())
            parts_left[name] -= 1
            if parts_left[name]:
                continue
            g = group_of[name]
            tensors_left[g.target] -= 1
            if tensors_left[g.target] == 0:
                _install(model, builder, g, tensors)
                for n in g.names:
                    del tensors[n]  # the stored parts now live in the module only (or were expanded)
    finally:
        bar.close()

    if "lm_head.weight" not in names:  # tied: the output projection reads the embedding table
        emb = model.embed_tokens
        model.lm_head = emb.as_linear() if isinstance(emb, QuantEmbedding) else \
            Linear(args.dim, args.vocab_size, weight=emb.weight)
    for n, b in list(model.named_buffers()):
        if b is not None and b.is_meta:
            raise QRunError(f"internal error: {n} was not loaded")  # plan() should make this impossible
    if dev.type == "cuda":
        check_kv_cache_fits(args, max_seq_len, dtype, torch.cuda.mem_get_info(dev)[0], max_batch)
    model.setup_caches(max_batch, max_seq_len, dev, dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    llm = LLM(model, tokenizer, cfg, device=dev, max_seq_len=max_seq_len, eos_ids=eos_ids(header, tokenizer),
              header=header)
    return llm.accelerate(graph=graph)


def _install(model: Transformer, b: _Builder, g: Group, tensors) -> None:
    if g.kind == "norm":  # keep the module (it knows its eps); only its weight comes from the file
        model.get_submodule(g.target).weight = b.dense(g.weights[0], tensors[g.weights[0]])
    elif g.kind == "embedding":
        _set(model, g.target, b.embedding(g.weights[0], tensors))
    elif g.kind == "silu_mul":
        _set(model, g.target, b.silu_mul(g.weights, tensors))
    else:  # o and down have no RMSNorm in front to fuse: the tensor-core GEMV's layout
        _set(model, g.target, b.linear(g.weights, g.biases, tensors,
                                       tensor_cores=g.target.endswith(("o_proj", "down_proj"))))
