"""`qrun bench`: load time, time to first token, prefill and decode speed, memory, achieved bandwidth.

Decode at batch 1 reads every weight once per token, so tokens/s x bytes read per token is the bandwidth the
runtime achieves; next to the copy bandwidth measured at start it says how far from the hardware we are.
Prompts are random token ids: speed does not depend on what the tokens mean.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from qrun.errors import QRunError


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy GB/s, counting bytes read plus bytes written (METHOD.md's copy ceiling)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_per_token(model, batch: int, context: int) -> dict[str, int]:
    """Bytes one decode step must read: every weight buffer except the embedding table (one row per token,
    unless the table is also the tied lm_head), plus the KV cache of `context` positions."""
    emb = model.embed_tokens
    tied = any(b is getattr(emb, "weight", None) or b is getattr(emb, "qweight", None)
               for b in model.lm_head.buffers())
    skip = set() if tied else {id(b) for b in emb.buffers()}
    caches = {id(layer.self_attn.kv_cache.k_cache) for layer in model.layers} | \
             {id(layer.self_attn.kv_cache.v_cache) for layer in model.layers}
    seen = {id(model.rope_cos), id(model.rope_sin)}  # RoPE tables: one row read per step
    weights = 0
    for b in model.buffers():
        if b is None or id(b) in seen or id(b) in skip or id(b) in caches:
            continue
        seen.add(id(b))
        weights += b.numel() * b.element_size()
    a = model.args
    kv = 2 * a.n_layers * batch * a.n_kv_heads * context * a.head_dim * model.norm.weight.element_size()
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


@torch.inference_mode()
def bench(path: str, device: str | None = None, prompt_len: int = 128, gen_len: int = 128, batch: int = 1,
          runs: int = 3, graph: bool = True, max_seq_len: int | None = None, compare_hf: bool = False,
          progress: bool = False, pipeline: bool = True) -> dict[str, Any]:
    """pipeline: decode greedily through the run-ahead loop generate() uses where the runtime has one (the
    CUDA graph); False times the loop that reads every token before starting the next step (to measure the
    gain)."""
    import qrun
    from qrun.runtime.generate import prefill, run_ahead
    from qrun.runtime.sampling import greedy
    from qrun.runtime.loader import resolve_device

    if batch < 1:
        raise QRunError(f"--batch must be at least 1, not {batch}")
    if prompt_len < 1 or gen_len < 2:
        raise QRunError("--prompt-len must be >= 1 and --gen-len >= 2")
    dev = resolve_device(device)
    copy_gbps = copy_bandwidth(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    max_seq_len = max_seq_len or (prompt_len + gen_len)
    if max_seq_len < prompt_len + gen_len - 1:  # the last decode step writes position prompt_len + gen_len - 2
        raise QRunError(f"--max-seq-len {max_seq_len} is too short for --prompt-len {prompt_len} and "
                        f"--gen-len {gen_len} (needs {prompt_len + gen_len - 1})")
    _sync(dev)
    t0 = time.perf_counter()
    llm = qrun.load(path, device=str(dev), max_seq_len=max_seq_len, progress=progress, graph=graph,
                    max_batch=batch)
    _sync(dev)
    load_s = time.perf_counter() - t0
    from qrun.runtime.stcmp import Reader
    r = Reader(path)
    file_bytes, raw_bytes = r.size, sum(t.raw_bytes for t in r.tensors.values())
    r.close()
    model = llm.model
    vocab = model.args.vocab_size
    step = llm.decode_step
    ahead = llm.greedy_step if pipeline else None

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(dev)  # (B, T)
    positions = torch.arange(prompt_len, device=dev)

    def one_run():
        _sync(dev)
        t = time.perf_counter()
        logits = prefill(model, prompt, positions)
        tok = greedy(logits)  # (B,)
        if ahead is not None:  # what generate() does for greedy decoding: host reads one step behind
            tokens = run_ahead(ahead, tok, prompt_len, gen_len)
            next(tokens)  # the first token, on the host (step 1 is already queued)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            for _ in tokens:
                pass
        else:
            tok.tolist()
            ttft = time.perf_counter() - t
            pos = torch.tensor([prompt_len], device=dev)
            t = time.perf_counter()
            for _ in range(gen_len - 1):
                logits = step(tok.view(batch, 1), pos)
                tok = greedy(logits)
                tok.tolist()  # the host sync this loop makes per step, before it starts the next
                pos += 1
        dec = time.perf_counter() - t
        return ttft, batch * (gen_len - 1) / dec  # tokens/s over the whole batch

    t = time.perf_counter()
    one_run()  # warm-up: Triton autotuning, graph capture
    warmup_s = time.perf_counter() - t
    warmup_peak = 0
    if dev.type == "cuda":  # the tuner's transient weight copies (ops._pick_chain) stay out of the run's peak
        warmup_peak = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    results = [one_run() for _ in range(runs)]
    ttft = statistics.median(r[0] for r in results)
    decode_tok_s = statistics.median(r[1] for r in results)
    bpt = bytes_per_token(model, batch, prompt_len + gen_len // 2)  # per decode step (all B sequences)
    out = {"model": path, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "max_seq_len": max_seq_len,
           "cuda_graph": bool(graph and dev.type == "cuda"), "run_ahead": ahead is not None,
           "warmup_s": warmup_s,
           "load_s": load_s, "load_gbps_compressed": file_bytes / load_s / 1e9,
           "load_gbps_raw": raw_bytes / load_s / 1e9, "ttft_s": ttft, "prefill_tok_s": batch * prompt_len / ttft,
           "decode_tok_s": decode_tok_s,  # all sequences together; per sequence: / batch
           "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0,
           "peak_gpu_bytes_warmup": warmup_peak,
           "bytes_per_token": bpt, "achieved_gbps": bpt["total"] * decode_tok_s / batch / 1e9,
           "copy_gbps": copy_gbps}
    from qrun.kernels import ops  # the configs the tuner picked in this process (decode speed depends on them)
    out["kernel_configs"] = {repr(k): v for k, v in ops._tuned.items()}
    out["pct_of_copy"] = 100 * out["achieved_gbps"] / copy_gbps if copy_gbps == copy_gbps else None
    if compare_hf:
        del llm, model, step, ahead
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        out["hf"] = bench_hf(path, dev, prompt, gen_len, runs)
        out["speedup_vs_hf"] = decode_tok_s / out["hf"]["decode_tok_s"]
    return out


@torch.inference_mode()
def bench_hf(path: str, dev: torch.device, prompt: torch.Tensor, gen_len: int, runs: int) -> dict[str, Any]:
    """Hugging Face transformers on the same config and the same (dequantized) weights, BF16 on CUDA and
    float32 on the CPU, eager, with its default dynamic KV cache."""
    try:
        import transformers
    except ImportError:
        raise QRunError("--compare hf needs transformers (pip install transformers)") from None
    from qrun.quant import dequantize_parts, effective_scales
    from qrun.runtime.stcmp import Reader

    r = Reader(path)
    cfg = transformers.AutoConfig.for_model(**r.config)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device(dev):  # random init on the device itself (fast on a GPU), then overwritten
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = {}
    for name, info in r.tensors.items():
        parts = r.read_parts(name, threads=8)
        if "data" in parts:
            state[name] = parts["data"].to(dev, dtype)
        else:
            if "scales_q" in parts:
                parts = {**parts, "scales": effective_scales(parts).half()}
            parts = {k: v.to(dev) for k, v in parts.items()}
            state[name] = dequantize_parts(info.encoding, parts, tuple(info.shape), info.entry["block_size"], dtype)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(m != "lm_head.weight" for m in missing):
        raise QRunError(f"transformers' model does not match the file: missing {missing}, unexpected {unexpected}")
    hf.eval()
    del state
    times = []
    for i in range(runs + 1):
        _sync(dev)
        t = time.perf_counter()
        hf.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        _sync(dev)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(prompt, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False)
        _sync(dev)
        tn = time.perf_counter() - t
        if i:
            times.append((t1, prompt.shape[0] * (gen_len - 1) / max(tn - t1, 1e-9)))
    return {"dtype": str(dtype).replace("torch.", ""), "ttft_s": statistics.median(t[0] for t in times),
            "decode_tok_s": statistics.median(t[1] for t in times)}
