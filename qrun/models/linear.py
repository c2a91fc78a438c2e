"""The layers that hold weights: dense or block-quantized, behind the same call.

The model (qrun/models/llama.py) is built with dense `Linear`/`Embedding` placeholders on the meta device;
the loader (qrun/runtime/loader.py) swaps in filled modules of these classes, chosen by each tensor's
encoding in the file. Nothing here knows the file format; the quantized layouts are those of qrun/quant.py
and the matmuls are qrun.kernels calls, so a faster kernel plugs in without touching this file.
All weights are buffers: qrun only runs inference.

Every linear takes two optional fusions, so that on the GPU a decode step needs no separate norm or add
kernels: `norm` (an RMSNorm module: anything with .weight and .eps) is applied to x first, and `residual`
(..., N) is added to the output. On the CPU both are done exactly as the unfused model would do them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qrun import kernels
from qrun.quant import dequantize_parts


class Linear(nn.Module):
    """y = x @ W^T + b with a dense weight W (N, K) in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 weight: torch.Tensor | None = None, bias_tensor: torch.Tensor | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if weight is None:
            weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        if bias and bias_tensor is None:
            bias_tensor = torch.empty(out_features, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias_tensor)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(norm(x) if norm is not None else x, self.weight, self.bias)
        return y if residual is None else residual + y


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b, W stored packed: qweight (N, Kp) int8 or (N, Kp/2) uint8, scales (N, Kp/B)
    fp16/fp32, zeros (N, Kp/B) uint8 for int4_asym, bias (N,) in the compute dtype. `layout` names how the
    kernels find the parts in memory (qrun.kernels.layout: "rows" canonical, "il4" interleaved for the GPU)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, *, encoding: str, block_size: int, in_features: int,
                 layout: str = "rows"):
        super().__init__()
        self.encoding, self.block_size, self.layout = encoding, block_size, layout
        self.in_features, self.out_features = in_features, scales.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, encoding=self.encoding,
                                    block_size=self.block_size, in_features=self.in_features,
                                    norm_weight=None if norm is None else norm.weight,
                                    eps=0.0 if norm is None else norm.eps, residual=residual, layout=self.layout)

    def rope_kv(self, x, norm, cos, sin, input_pos, k_cache, v_cache, n_heads) -> torch.Tensor | None:
        """The decode step's qkv projection of one token with RoPE and the cache write fused in (QRUN_ROPE_QKV):
        q (1, H, hd), k and v written into the caches; None where that kernel does not apply."""
        if not (kernels.ROPE_QKV and x.is_cuda and x.numel() == self.in_features and self.layout == "il4"
                and k_cache.shape[-1] % 8 == 0):
            return None
        return kernels.quant_linear_rope_kv(x, self.qweight, self.scales, self.zeros, self.bias,
                                            encoding=self.encoding, block_size=self.block_size,
                                            in_features=self.in_features,
                                            norm_weight=None if norm is None else norm.weight,
                                            eps=0.0 if norm is None else norm.eps, cos=cos, sin=sin,
                                            input_pos=input_pos, k_cache=k_cache, v_cache=v_cache, n_heads=n_heads)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.encoding}, block {self.block_size}, {self.layout}"


class Concat(nn.Module):
    """Several linears on the same input, outputs concatenated: q/k/v when the file stores them with
    different encodings and they cannot be fused into one weight."""

    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y if residual is None else residual + y


class FusedSiluMul(nn.Module):
    """silu(x Wg^T) * (x Wu^T) from ONE weight whose rows [0, I) are the gate and [I, 2I) the up projection.
    A QuantLinear goes through the fused kernel (one GEMV, SiLU*mul epilogue)."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        p = self.proj
        if isinstance(p, QuantLinear):
            return kernels.quant_linear_silu_mul(x, p.qweight, p.scales, p.zeros, encoding=p.encoding,
                                                 block_size=p.block_size, in_features=p.in_features,
                                                 norm_weight=None if norm is None else norm.weight,
                                                 eps=0.0 if norm is None else norm.eps, layout=p.layout)
        g, u = p(x, norm=norm).chunk(2, dim=-1)
        return F.silu(g) * u


class SiluMul(nn.Module):
    """silu(gate(x)) * up(x) with two separate linears (gate and up stored with different encodings)."""

    def __init__(self, gate: nn.Module, up: nn.Module):
        super().__init__()
        self.gate, self.up = gate, up

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        return F.silu(self.gate(x)) * self.up(x)


class Embedding(nn.Module):
    """Token ids (B, T) -> rows of a dense table weight (V, D)."""

    def __init__(self, num_embeddings: int, dim: int, weight: torch.Tensor | None = None, device=None,
                 dtype=None):
        super().__init__()
        if weight is None:
            weight = torch.empty(num_embeddings, dim, device=device, dtype=dtype)
        self.register_buffer("weight", weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class QuantEmbedding(nn.Module):
    """Token ids (B, T) -> (B, T, D): gather the packed rows and their scales, then dequantize only those rows.
    The table has the QuantLinear layout, so a tied lm_head can share these buffers (see `as_linear`)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *,
                 encoding: str, block_size: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.encoding, self.block_size, self.dim, self.dtype = encoding, block_size, dim, dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # (B*T,)
        if flat.is_cuda and kernels.quant_embedding is not None and \
                kernels.embedding_supported(self.encoding, self.scales):  # one kernel, the same values
            rows = kernels.quant_embedding(flat, self.qweight, self.scales, self.zeros, self.encoding,
                                           self.block_size, self.dim, self.dtype)
            return rows.reshape(*ids.shape, self.dim)
        parts = {"qweight": self.qweight[flat], "scales": self.scales[flat]}
        if self.zeros is not None:
            parts["zeros"] = self.zeros[flat]
        rows = dequantize_parts(self.encoding, parts, (flat.numel(), self.dim), self.block_size, self.dtype)
        return rows.reshape(*ids.shape, self.dim)

    def as_linear(self) -> QuantLinear:
        return QuantLinear(self.qweight, self.scales, self.zeros, None, encoding=self.encoding,
                           block_size=self.block_size, in_features=self.dim)
