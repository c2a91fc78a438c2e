"""Quantized matmul kernels. They know nothing of models or files: tensors in the qrun/quant.py layout in,
activations out.

    quant_linear(x, qweight, scales, zeros, bias, encoding=..., block_size=..., in_features=...,
                 norm_weight=None, eps=0.0, residual=None)
        x (..., K) bf16/fp16/fp32 -> (..., N), y = xn @ dequant(W)^T + bias (+ residual), where
        xn = norm_weight * rmsnorm(x) with norm_weight, else x (fused into the M = 1 int4 kernel)
    quant_linear_silu_mul(x, qweight, scales, zeros, encoding=..., block_size=..., in_features=...,
                          norm_weight=None, eps=0.0)
        weight rows [0, N/2) = gate, [N/2, N) = up -> (..., N/2) silu(gate) * up

Scales are float16 or float32 (N, Kp/B); double-quantized scales are expanded by the loader first.
layout="il4": int4 parts interleaved by `interleave4` (layout.py), which the decode GEMV reads fastest; the
loader makes them for CUDA. layout="tc16": int4 parts in 16-row tiles by `to_tc16`, for the tensor-core
decode GEMV (gemv_tc.py). Both calls take it; the default "rows" is the canonical layout.
On CUDA tensors these call the Triton kernels through the custom ops qrun::quant_linear and
qrun::quant_linear_silu_mul (see ops.py: GEMV for M = 1, tl.dot GEMM for M >= 2); elsewhere the
plain-torch reference (reference.py).

CUDA-only fused ops for the decode step (custom ops, capturable in a CUDA graph):
    rms_norm(x, w, eps) -> w * rmsnorm(x)
    rope_kv_write(qkv, cos, sin, input_pos, k_cache, v_cache, n_heads) -> rotated q (B, H, hd)
    decode_attention(q (B, H, hd), k_cache, v_cache, input_pos) -> (B, H * hd)
    rope_attention(qkv, cos, sin, input_pos, k_cache, v_cache, counters, n_heads) -> (B, H * hd): the two above
        in one kernel, the combine of the cache slices included; the model takes it when FUSED_ATTN
        (QRUN_FUSED_ATTN=1; or =2: the combine stays a kernel of its own; both opt-in, PERF.md rounds 8-9)
    quant_embedding(ids (T,), qweight, scales, zeros, encoding, block_size, dim, dtype) -> (T, dim): the
        dequantized table rows, as qrun/quant.py's dequantize_parts gives them (embedding.py)
    argmax_advance(logits (B, V) float32, ids (B,), pos (1,)): ids = argmax(logits), pos += 1 (argmax.py)
"""
from __future__ import annotations

import os

import torch

from .layout import can_interleave4, deinterleave4, interleave4  # noqa: F401
from .reference import quant_linear_ref, quant_linear_silu_mul_ref, rms_norm_ref  # noqa: F401

try:  # triton is a Linux-only dependency; without it only the reference path exists
    from . import ops as _ops
    from .decode_attention import decode_attention  # noqa: F401  (CUDA decode step: attention over the cache)
    from .rmsnorm import rms_norm  # noqa: F401  (CUDA: RMSNorm in one kernel)
    from .rope_cache import rope_kv_write  # noqa: F401  (CUDA decode step: RoPE + KV-cache write)
    from .decode_attention import rope_attention  # noqa: F401  (CUDA decode step: both of the above, one kernel)
    from .embedding import quant_embedding, supported as embedding_supported  # noqa: F401  (CUDA: table lookup)
    from .argmax import argmax_advance  # noqa: F401  (CUDA greedy step: token = argmax, position + 1)
except ImportError:  # pragma: no cover
    _ops = decode_attention = rms_norm = rope_kv_write = rope_attention = None
    quant_embedding = embedding_supported = argmax_advance = None
# "1": RoPE, cache write, attention and combine in one kernel; "2": the first three, then the combine kernel
FUSED_ATTN = {"1": 1, "2": 2}.get(os.environ.get("QRUN_FUSED_ATTN", "0"), 0)
# "1": the decode step's qkv GEMV also does RoPE and the cache write (ops.quant_linear_rope_kv_triton); opt-in
# until timed on the GPU (docs/PERF.md round 11)
ROPE_QKV = os.environ.get("QRUN_ROPE_QKV", "0") == "1"


def quant_linear_rope_kv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         bias: torch.Tensor | None, *, encoding: str, block_size: int, in_features: int,
                         norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                         input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         n_heads: int) -> torch.Tensor:
    """CUDA, il4 int4 weights, one token: q (1, H, hd) rotated; k rotated and v written into the caches."""
    return torch.ops.qrun.quant_linear_rope_kv(x, qweight, scales, zeros, bias, encoding, block_size, in_features,
                                               norm_weight, eps, cos, sin, input_pos, k_cache, v_cache, n_heads)


# Eager calls (and CUDA graph capture, which records the same launches) go to the launcher directly; only
# torch.compile needs the custom ops (their fake implementations trace the shapes). The op's dispatch (the
# dispatcher, its dynamo-disable wrapper, alias checks) is host time, and the prefill runs host-bound; the gain
# was too small to see beside the spread between processes (docs/PERF.md attempt 77).
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, *, encoding: str, block_size: int, in_features: int,
                 norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                 residual: torch.Tensor | None = None, layout: str = "rows") -> torch.Tensor:
    if x.is_cuda and _ops is not None:
        if not torch.compiler.is_compiling():  # eager or graph capture: the launcher itself (see above)
            return _ops.quant_linear_triton(x, qweight, scales, zeros, bias, encoding, block_size, in_features,
                                            norm_weight, eps, residual, layout)
        return torch.ops.qrun.quant_linear(x, qweight, scales, zeros, bias, encoding, block_size, in_features,
                                           norm_weight, eps, residual, layout)
    return quant_linear_ref(x, qweight, scales, zeros, bias, encoding, block_size, in_features, norm_weight, eps,
                            residual, layout)


def quant_linear_silu_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, *, encoding: str, block_size: int,
                          in_features: int, norm_weight: torch.Tensor | None = None,
                          eps: float = 0.0, layout: str = "rows") -> torch.Tensor:
    if x.is_cuda and _ops is not None:
        if not torch.compiler.is_compiling():
            return _ops.quant_linear_silu_mul_triton(x, qweight, scales, zeros, encoding, block_size, in_features,
                                                     norm_weight, eps, layout)
        return torch.ops.qrun.quant_linear_silu_mul(x, qweight, scales, zeros, encoding, block_size,
                                                    in_features, norm_weight, eps, layout)
    return quant_linear_silu_mul_ref(x, qweight, scales, zeros, encoding, block_size, in_features, norm_weight,
                                     eps, layout)
