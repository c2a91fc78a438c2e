"""Block-wise weight quantization: the math of every encoding a .stcmp file can hold.

A weight W of shape (N, K) (out_features, in_features) is cut into blocks of `block_size` consecutive
elements along K (the input dimension, so one block never straddles two output rows). K is zero-padded
to Kp = ceil(K / block_size) * block_size; padded elements quantize to 0 and are never read back.

Encodings (the file's `encoding` string and the arrays ("parts") each one stores):

  int8_sym   qweight int8  (N, Kp)      scales (N, Kp/B)   w = q * s,        s = absmax / 127, q in [-128, 127]
  int4_sym   qweight uint8 (N, Kp/2)    scales (N, Kp/B)   w = q * s,        s = absmax / 7,   q in [-8, 7]
  int4_asym  qweight uint8 (N, Kp/2)    scales, zeros uint8 (N, Kp/B)
                                                           w = (q - z) * s,  s = (max - min) / 15, q in [0, 15]
  nf4        qweight uint8 (N, Kp/2)    scales (N, Kp/B)   w = NF4[q] * s,   s = absmax, q = nearest code index

INT4 packing: two values per byte, the FIRST value (even k) in the LOW nibble, the second (odd k) in the
high nibble (seed 002's convention; seed 000 puts the first value high, see `pack_int4(first="high")`).
Signed int4 nibbles are two's complement.

Scales are float16 (default) or float32. With double quantization (seed 001 §4) the scales are stored as
uint8 codes `scales_q` (N, Kp/B) plus one float32 `scales_meta` per group of 256 consecutive blocks of the
flattened scale array; s = scales_meta[i // 256] * scales_q[i]. The codes are rounded *up*, so the
effective scale is never smaller than absmax/qmax and no weight is clipped; weights are then quantized
against the effective scale, so the error bound |w - w_hat| <= s/2 holds for the scale actually used.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

BLOCK_SIZES = (32, 64, 128, 256)
ENCODINGS = ("int8_sym", "int4_sym", "int4_asym", "nf4")
DQ_GROUP = 256  # blocks per float32 meta-scale under double quantization

# The QLoRA NormalFloat-4 code book (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) normalised to
# [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


class QuantError(ValueError):
    """A weight that cannot be quantized (NaN/Inf, bad shape, bad option)."""


@dataclass
class QuantizedTensor:
    """The stored form of one quantized weight: named parts plus what is needed to read them back."""

    encoding: str
    shape: tuple[int, int]  # logical (N, K), before padding
    block_size: int
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())


# ----------------------------------------------------------------------------------------------- packing

def pack_int4(q: torch.Tensor, first: str = "low") -> torch.Tensor:
    """(..., 2m) integer values in [-8, 15] -> (..., m) uint8, two nibbles a byte.

    first="low" (the .stcmp layout): element 2j in bits 0-3, element 2j+1 in bits 4-7.
    first="high" (seed 000 §4): element 2j in bits 4-7.
    """
    if q.shape[-1] % 2:
        raise QuantError("pack_int4 needs an even number of values in the last dimension")
    n = q.to(torch.int16) & 0x0F
    a, b = n[..., 0::2], n[..., 1::2]
    if first == "high":
        a, b = b, a
    elif first != "low":
        raise QuantError(f"first must be 'low' or 'high', not {first!r}")
    return (a | (b << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool = True, first: str = "low") -> torch.Tensor:
    """(..., m) uint8 -> (..., 2m) int8: two's-complement nibbles if signed, else 0..15."""
    p = packed.to(torch.int16)
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    if first == "high":
        lo, hi = hi, lo
    out = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        out = out - ((out & 0x8) << 1)  # 8..15 -> -8..-1
    return out.to(torch.int8)


# ------------------------------------------------------------------------------------------ quantization

def _blocks(w: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, int]:
    """(N, K) -> float32 (N, Kp/B, B), zero-padded along K."""
    if w.dim() != 2:
        raise QuantError(f"{name}: only 2-D weights are quantized, got shape {tuple(w.shape)}")
    if block_size not in BLOCK_SIZES:
        raise QuantError(f"block size must be one of {BLOCK_SIZES}, not {block_size}")
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise QuantError(f"{name}: weight holds NaN or Inf values; refusing to quantize it")
    n, k = w.shape
    kp = -(-k // block_size) * block_size
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    return w.reshape(n, kp // block_size, block_size), k


def _store_scales(s: torch.Tensor, scale_dtype: torch.dtype, double_quant: bool
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Round the ideal float32 scales (N, nb) to what is stored. Returns (effective float32 scales, parts)."""
    if double_quant:
        flat = s.reshape(-1)
        pad = (-flat.numel()) % DQ_GROUP
        g = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, DQ_GROUP)
        meta = g.amax(dim=1) / 255.0  # (groups,) float32
        safe = torch.where(meta > 0, meta, torch.ones_like(meta))
        # ceil: the effective scale is >= the ideal one, so nothing clips (a bit coarser instead).
        codes = torch.ceil(g / safe[:, None] - 1e-6).clamp_(0, 255)
        eff = (codes * meta[:, None]).reshape(-1)[: flat.numel()].reshape(s.shape)
        codes = codes.reshape(-1)[: flat.numel()].reshape(s.shape).to(torch.uint8)
        return eff, {"scales_q": codes, "scales_meta": meta.contiguous()}
    if scale_dtype not in (torch.float16, torch.float32):
        raise QuantError("scales are stored as float16 or float32")
    stored = s.to(scale_dtype)
    if scale_dtype == torch.float16:
        # An absmax past fp16's range would store inf: refuse rather than write a model that gives NaN.
        if not torch.isfinite(stored).all():
            raise QuantError("a block scale overflows float16; use float32 scales")
    return stored.to(torch.float32), {"scales": stored.contiguous()}


def quantize(w: torch.Tensor, encoding: str = "int4_sym", block_size: int = 128,
             scale_dtype: torch.dtype = torch.float16, double_quant: bool = False,
             name: str = "weight", clip_ratio: torch.Tensor | float | None = None) -> QuantizedTensor:
    """Quantize a 2-D weight (N, K) block-wise. Vectorised: no Python loop over blocks.

    clip_ratio (optional, a float or a (N, Kp/B) tensor in (0, 1]) shrinks each block's range before the
    scale is computed: the data-free MSE clip search and calibration pass it in.
    """
    if encoding not in ENCODINGS:
        raise QuantError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    blocks, k = _blocks(w, block_size, name)  # (N, nb, B)
    n, nb, _ = blocks.shape
    ratio = 1.0 if clip_ratio is None else (
        clip_ratio if isinstance(clip_ratio, float) else clip_ratio.to(torch.float32).reshape(n, nb, 1))
    parts: dict[str, torch.Tensor] = {}

    if encoding == "int4_asym":
        # The range always includes 0, so z lies in [0, 15] and a constant block is exact.
        lo = (blocks.amin(dim=2, keepdim=True) * ratio).clamp(max=0)
        hi = (blocks.amax(dim=2, keepdim=True) * ratio).clamp(min=0)
        s_ideal = ((hi - lo) / 15.0).squeeze(2)
        s, sparts = _store_scales(s_ideal, scale_dtype, double_quant)
        s3 = s.unsqueeze(2)
        safe = torch.where(s3 > 0, s3, torch.ones_like(s3))
        z = torch.round(-lo / safe).clamp(0, 15)
        q = torch.where(s3 > 0, torch.round(blocks / safe) + z, z).clamp(0, 15)
        parts["qweight"] = pack_int4(q.reshape(n, nb * block_size).to(torch.int16))
        parts.update(sparts)
        parts["zeros"] = z.squeeze(2).to(torch.uint8).contiguous()
        return QuantizedTensor(encoding, (n, k), block_size, parts)

    absmax = blocks.abs().amax(dim=2, keepdim=True) * ratio
    if encoding == "nf4":
        s, sparts = _store_scales(absmax.squeeze(2), scale_dtype, double_quant)
        s3 = s.unsqueeze(2)
        safe = torch.where(s3 > 0, s3, torch.ones_like(s3))
        x = (blocks / safe).clamp(-1, 1)
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=blocks.device)
        # Nearest code by midpoints: bucketize keeps memory at one index per weight.
        mids = (code[1:] + code[:-1]) / 2
        q = torch.bucketize(x, mids)
        q = torch.where(s3 > 0, q, torch.full_like(q, 7))  # code 7 is exactly 0
        parts["qweight"] = pack_int4(q.reshape(n, nb * block_size).to(torch.int16))
        parts.update(sparts)
        return QuantizedTensor(encoding, (n, k), block_size, parts)

    qmax, qmin = (127, -128) if encoding == "int8_sym" else (7, -8)
    s, sparts = _store_scales((absmax / qmax).squeeze(2), scale_dtype, double_quant)
    s3 = s.unsqueeze(2)
    safe = torch.where(s3 > 0, s3, torch.ones_like(s3))
    q = torch.where(s3 > 0, torch.round(blocks / safe), torch.zeros_like(blocks)).clamp(qmin, qmax)
    q = q.reshape(n, nb * block_size)
    parts["qweight"] = q.to(torch.int8).contiguous() if encoding == "int8_sym" else pack_int4(q)
    parts.update(sparts)
    return QuantizedTensor(encoding, (n, k), block_size, parts)


# -------------------------------------------------------------------------------------- dequantization

def effective_scales(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 scales (N, nb) whichever way they were stored."""
    if "scales" in parts:
        return parts["scales"].to(torch.float32)
    codes, meta = parts["scales_q"], parts["scales_meta"]
    flat = codes.reshape(-1).to(torch.float32)
    idx = torch.arange(flat.numel(), device=flat.device) // DQ_GROUP
    return (flat * meta.to(torch.float32)[idx]).reshape(codes.shape)


def dequantize_parts(encoding: str, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                     block_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored parts -> dense (N, K) weight. Vectorised; works on any device."""
    n, k = shape
    s = effective_scales(parts)  # (N, nb)
    nb = s.shape[1]
    qw = parts["qweight"]
    if encoding == "int8_sym":
        q = qw.to(torch.float32)
    elif encoding == "int4_sym":
        q = unpack_int4(qw, signed=True).to(torch.float32)
    elif encoding == "int4_asym":
        q = unpack_int4(qw, signed=False).to(torch.float32)
        z = parts["zeros"].to(torch.float32)
        q = (q.reshape(n, nb, block_size) - z.unsqueeze(2)).reshape(n, nb * block_size)
    elif encoding == "nf4":
        idx = unpack_int4(qw, signed=False).to(torch.long)
        q = torch.tensor(NF4_CODE, dtype=torch.float32, device=qw.device)[idx]
    else:
        raise QuantError(f"unknown encoding {encoding!r}")
    w = (q.reshape(n, nb, block_size) * s.unsqueeze(2)).reshape(n, nb * block_size)
    return w[:, :k].to(dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_parts(qt.encoding, qt.parts, qt.shape, qt.block_size, dtype)


def bits_per_param(qt: QuantizedTensor) -> float:
    """Stored bits per real (unpadded) weight, scales, zeros and meta-scales included."""
    n, k = qt.shape
    return 8.0 * qt.nbytes / (n * k)
