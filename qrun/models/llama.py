"""The Llama family in one file: qwen2 (Qwen2, Qwen2.5), llama (Llama 2/3, SmolLM) and mistral without a
sliding window. Pre-norm decoder: RMSNorm, attention with RoPE and grouped KV heads, SwiGLU MLP.

Decode-friendly by construction: the KV cache is preallocated (batch, kv_heads, max_seq, head_dim) and written
at `input_pos`, a device tensor; attention always reads the whole cache under a mask built from `input_pos`, so
no shape depends on how many tokens came before (a decode step can be captured in a CUDA graph).

The model knows nothing of the file: q/k/v are one `qkv_proj` and gate/up one `gate_up_proj` module, dense
placeholders here, which the loader replaces with whatever the file holds (qrun/models/linear.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from qrun import kernels
from qrun.errors import QRunError
from qrun.models.linear import Embedding, FusedSiluMul, Linear

SUPPORTED = ("qwen2", "llama", "mistral")
_GQA_SDPA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa= exists


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}; None: plain RoPE
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v have a bias, o does not
    o_bias: bool = False
    sliding_window: int | None = None  # mistral: fine only while max_seq_len <= window

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise QRunError(f"{self.n_heads} attention heads is not a multiple of {self.n_kv_heads} KV heads")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """From a Hugging Face config.json (transformers 4 `rope_scaling`/`rope_theta` or 5 `rope_parameters`)."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise QRunError(f"unsupported architecture {mt!r} (qrun runs {', '.join(SUPPORTED)})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise QRunError(f"unsupported activation {cfg['hidden_act']!r} (qrun runs SwiGLU with silu)")
        if cfg.get("mlp_bias"):
            raise QRunError("unsupported config: mlp_bias=true")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise QRunError("unsupported config: partial rotary embeddings")
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "llama3", "linear"):
            raise QRunError(f"unsupported rope scaling type {rtype!r} (qrun knows default, linear, llama3)")
        window = cfg.get("sliding_window")
        if mt == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None  # Qwen2 configs carry a window size that is only used with use_sliding_window
        bias = bool(cfg.get("attention_bias", False))
        return cls(model_type=mt, vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"],
                   n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                   n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   intermediate_size=cfg["intermediate_size"], head_dim=cfg.get("head_dim") or 0,
                   norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                   rope_scaling=None if rtype == "default" else {**rope, "rope_type": rtype},
                   max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   qkv_bias=(mt == "qwen2") or bias, o_bias=bias, sliding_window=window)


# ------------------------------------------------------------------------------------------------ RoPE

def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies, with llama3 or linear scaling applied."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = args.rope_scaling
    if rs is None:
        return inv
    factor = float(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv / factor
    # llama3 (Llama 3.1): long wavelengths are divided by `factor`, short ones kept, the middle interpolated.
    old = rs["original_max_position_embeddings"]
    lo_f, hi_f = rs["low_freq_factor"], rs["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo_f, inv / factor, inv)
    smooth = (old / wavelen - lo_f) / (hi_f - lo_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi_f) & (wavelen <= old / lo_f)
    return torch.where(medium, smoothed, scaled)


def rope_tables(args: ModelArgs, max_seq: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_seq, head_dim) float32, the frequencies repeated for both halves (rotate-half layout)."""
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), rope_inv_freq(args))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (T, hd) in x.dtype. Hugging Face layout: dims [0, hd/2) pair with [hd/2, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ------------------------------------------------------------------------------------------------ blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> normed x. The model mostly passes this module to the linear that follows instead
        (qrun/models/linear.py), which fuses it into its kernel on the GPU."""
        if x.is_cuda and kernels.rms_norm is not None:  # one Triton kernel instead of ~8 small ones
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.rms_norm_ref(x, self.weight, self.eps)  # Hugging Face's roundings


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_seq: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        # (B * KV,) int32, zero between decode steps: the fused attention kernel's per-head arrival counters
        self.register_buffer("counters", torch.zeros(batch * n_kv_heads, device=device, dtype=torch.int32),
                             persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, KV, T, hd) at positions input_pos (T,); return the whole caches (B, KV, S, hd)."""
        b = k.shape[0]
        self.k_cache[:b].index_copy_(2, input_pos, k)
        self.v_cache[:b].index_copy_(2, input_pos, v)
        return self.k_cache[:b], self.v_cache[:b]


def gpu_decode(t: int, input_pos: torch.Tensor | None, x: torch.Tensor, head_dim: int) -> bool:
    """A decode step (one token a sequence, cache positions given) on the GPU: attention takes the fused
    decode kernels, which read the RoPE tables and the position themselves and need no mask."""
    return t == 1 and input_pos is not None and x.is_cuda and kernels.decode_attention is not None \
        and head_dim & (head_dim - 1) == 0


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = a.n_heads, a.n_kv_heads, a.head_dim
        self.qkv_proj = Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=a.qkv_bias)
        self.o_proj = Linear(a.n_heads * a.head_dim, a.dim, bias=a.o_bias)
        self.kv_cache: KVCache | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # full (max_seq, hd) tables, set with the cache

    def forward(self, x, cos, sin, mask, input_pos, kv_len=None, norm=None, residual=None):
        """x (B, T, D) -> o_proj(attention) (+ residual); norm: an RMSNorm applied to x first (fused into the
        qkv projection); cos/sin (T, hd); mask (T, S) bool, True = may attend; input_pos (T,) or None;
        kv_len: read only cache positions [0, kv_len) (S = kv_len), or the whole cache when None."""
        b, t, _ = x.shape
        if gpu_decode(t, input_pos, x, self.hd):
            # Decode step on the GPU: RoPE + cache write in one kernel (or in the qkv GEMV's epilogue, where the
            # projection offers it: rope_kv), attention reading only [0, pos].
            c = self.kv_cache
            rope_kv = getattr(self.qkv_proj, "rope_kv", None)
            q = None
            if rope_kv is not None and b == 1 and not kernels.FUSED_ATTN:
                q = rope_kv(x, norm, *self.rope, input_pos, c.k_cache, c.v_cache, self.n_heads)
            if q is None:
                qkv = self.qkv_proj(x, norm=norm)
                if kernels.FUSED_ATTN:  # all of it in one kernel (QRUN_FUSED_ATTN=1), or all but the combine (=2)
                    y = kernels.rope_attention(qkv, *self.rope, input_pos, c.k_cache, c.v_cache, c.counters,
                                               self.n_heads, kernels.FUSED_ATTN == 1)
                    return self.o_proj(y.view(b, 1, -1), residual=residual)
                q = kernels.rope_kv_write(qkv, *self.rope, input_pos, c.k_cache, c.v_cache, self.n_heads)
            y = kernels.decode_attention(q, c.k_cache, c.v_cache, input_pos)
            return self.o_proj(y.view(b, 1, -1), residual=residual)
        qkv = self.qkv_proj(x, norm=norm)
        q, k, v = qkv.split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1)
        q = apply_rope(q.view(b, t, self.n_heads, self.hd).transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = apply_rope(k.view(b, t, self.n_kv, self.hd).transpose(1, 2), cos, sin)  # (B, KV, T, hd)
        v = v.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, KV, max_seq, hd)
            if kv_len is not None:
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # (B, KV, S, hd)
        if _GQA_SDPA:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        else:
            r = self.n_heads // self.n_kv
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1),
                                               attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.hd), residual=residual)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_up_proj = FusedSiluMul(Linear(a.dim, 2 * a.intermediate_size))  # (B, T, D) -> (B, T, I)
        self.down_proj = Linear(a.intermediate_size, a.dim)

    def forward(self, x, norm=None, residual=None):
        """x (B, T, D) -> down(silu(gate(xn)) * up(xn)) (+ residual), xn = norm(x) when norm is given."""
        return self.down_proj(self.gate_up_proj(x, norm=norm), residual=residual)


class TransformerBlock(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.mlp = FeedForward(a)

    def forward(self, x, cos, sin, mask, input_pos, kv_len=None):
        """x (B, T, D) -> the block's output (B, T, D). Each norm is handed to the projection after it and
        each residual add to the projection before it, so that on the GPU they run inside those kernels."""
        h = self.self_attn(x, cos, sin, mask, input_pos, kv_len, norm=self.input_layernorm, residual=x)
        return self.mlp(h, norm=self.post_attention_layernorm, residual=h)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = Linear(args.dim, args.vocab_size)  # the loader shares the embedding when tied
        self.max_seq = 0
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)

    def setup_caches(self, max_batch: int, max_seq: int, device=None, dtype=None) -> None:
        """Allocate the KV caches (max_batch, kv_heads, max_seq, head_dim) and the RoPE tables, once."""
        a = self.args
        if a.sliding_window is not None and max_seq > a.sliding_window:
            raise QRunError(f"max_seq_len {max_seq} exceeds the model's sliding window {a.sliding_window}; "
                            f"qrun has no sliding-window attention: use --max-seq-len {a.sliding_window}")
        dtype = dtype or self.norm.weight.dtype
        device = device or self.norm.weight.device
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, a.n_kv_heads, max_seq, a.head_dim, device, dtype)
        self.rope_cos, self.rope_sin = rope_tables(a, max_seq, device)
        for layer in self.layers:
            layer.self_attn.rope = (self.rope_cos, self.rope_sin)
        self.max_seq = max_seq

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                last_only: bool = False, kv_len: int | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) with last_only.

        input_pos (T,) long on the model's device: the cache positions the tokens occupy; they attend to
        every cached position <= their own. None: a cache-free forward over positions 0..T-1.
        kv_len (host int, optional, > max(input_pos)): attend over cache positions [0, kv_len) only. Eager
        callers pass it to skip the empty tail of the cache; a captured decode step leaves it None so that
        every shape stays fixed.
        """
        t = tokens.shape[1]
        x = self.embed_tokens(tokens)
        if gpu_decode(t, input_pos, x, self.args.head_dim):
            mask = cos = sin = None  # the decode kernels need neither (and in a graph step they cost launches)
        else:
            if input_pos is None:
                pos = torch.arange(t, device=tokens.device)
                keys = pos
            else:
                pos = input_pos
                keys = torch.arange(self.max_seq if kv_len is None else kv_len, device=tokens.device)
            mask = keys[None, :] <= pos[:, None]  # (T, S)
            cos, sin = self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, kv_len)
        return self.lm_head(x[:, -1:] if last_only else x, norm=self.norm)
