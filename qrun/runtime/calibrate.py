"""Better INT4 than plain absmax: a data-free MSE clip search, and GPTQ calibrated on sample text.

Both produce ordinary `QuantizedTensor`s in the qrun/quant.py layouts, so the file format and the kernels do
not change: calibration only chooses better scales and better integer codes.

mse_clip_ratio(w, encoding, block_size)
    Data-free. For every block, try shrinking its range by a ratio r in [0.5, 1] and keep the r that minimises
    the block's squared reconstruction error. Clipping the one or two largest weights of a block buys a finer
    step for all the others; for 4-bit grids that wins on most blocks. Used by `convert --method mse`.

gptq_quantize(w, hessian, encoding, block_size, ...)
    GPTQ (Frantar et al. 2023): quantize one input column at a time and spread its rounding error over the
    columns not yet quantized, weighted by the inverse Hessian H = X^T X of the layer's calibration inputs, so
    that the layer's *output* error ||X W^T - X Q^T||^2 is what is minimised, not the weight error. Scales are
    chosen per block with the same clip search, weighted by diag(H) (how much each input channel matters).

calibrate(src, text_path, opts, calib_tokens)
    Runs the BF16 model one decoder layer at a time over the calibration text, collects H for every linear of
    that layer with forward hooks, quantizes the layer with GPTQ, and feeds the *quantized* layer's outputs to
    the next one (so later layers learn to compensate for earlier layers' errors). Only one layer's weights
    and one layer's activations are alive at a time. Without a text (text_path=None) it calibrates on
    seeded random token ids: data-free, and on the demo model still far better than absmax (docs/QUALITY.md).
"""
from __future__ import annotations

import torch

from qrun.quant import NF4_CODE, QuantError, QuantizedTensor, _store_scales, pack_int4

CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5


# ------------------------------------------------------------------------------------ fake quantization
#
# The same arithmetic as qrun.quant.quantize, on float32 (..., B) blocks with given (..., 1) ranges, returning
# the dequantized values. The clip search and GPTQ use these; tests check they match quantize()/dequantize().

def _grid(encoding: str) -> tuple[float, float]:
    if encoding == "int8_sym":
        return -128.0, 127.0
    if encoding == "int4_sym":
        return -8.0, 7.0
    if encoding == "int4_asym":
        return 0.0, 15.0
    if encoding == "nf4":
        return -1.0, 1.0
    raise QuantError(f"unknown encoding {encoding!r}")


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, amax: torch.Tensor, encoding: str
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ideal float32 scale (and zero point for int4_asym) from a block's clipped min, max and absmax."""
    if encoding == "int4_asym":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = (hi - lo) / 15.0
        z = torch.round(-lo / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, 15)
        return s, z
    if encoding == "nf4":
        return amax, None
    return amax / _grid(encoding)[1], None


def codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, encoding: str) -> torch.Tensor:
    """Integer codes (float32) of x under scale s (and zero z); s == 0 gives the code of 0."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if encoding == "nf4":
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=x.device)
        q = torch.bucketize((x / safe).clamp(-1, 1), (code[1:] + code[:-1]) / 2).to(torch.float32)
        return torch.where(s > 0, q, torch.full_like(q, 7.0))
    qmin, qmax = _grid(encoding)
    if encoding == "int4_asym":
        return torch.where(s > 0, torch.round(x / safe) + z, z.expand_as(x)).clamp(qmin, qmax)
    return torch.where(s > 0, torch.round(x / safe), torch.zeros_like(x)).clamp(qmin, qmax)


def decode(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, encoding: str) -> torch.Tensor:
    if encoding == "nf4":
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=q.device)
        return code[q.long()] * s
    if encoding == "int4_asym":
        return (q - z) * s
    return q * s


def fake_quant(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, encoding: str) -> torch.Tensor:
    return decode(codes(x, s, z, encoding), s, z, encoding)


# -------------------------------------------------------------------------------------- clip search

def _pad_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N, K) -> float32 (N, Kp/B, B), zero-padded (padding is exactly representable, so it adds no error)."""
    n, k = w.shape
    kp = -(-k // block_size) * block_size
    w = w.detach().to(torch.float32)
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    return w.reshape(n, kp // block_size, block_size)


_LUT: dict[str, torch.Tensor] = {}


def _nf4_lut(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _LUT:
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        x = torch.linspace(-1, 1, 4097)
        _LUT[key] = code[torch.bucketize(x, (code[1:] + code[:-1]) / 2)].to(device)
    return _LUT[key]


def _block_error(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, amax: torch.Tensor, encoding: str,
                 importance: torch.Tensor | None) -> torch.Tensor:
    """Squared reconstruction error per block (...,) for the given clipped ranges. In-place ops on one
    temporary: this is the hot loop of the data-free search."""
    s, z = scale_zero(lo, hi, amax, encoding)
    if encoding == "nf4":
        # Nearest code through a 4097-entry table over [-1, 1] instead of bucketize (10x faster); it can
        # only disagree within 1/4096 of a midpoint, where both codes are equally good.
        lut = _nf4_lut(blocks.device)
        inv = torch.where(s > 0, 1.0 / s.clamp(min=1e-30), torch.zeros_like(s))
        idx = torch.mul(blocks, inv).clamp_(-1, 1).add_(1).mul_(2048).round_().long()
        d = lut[idx].mul_(s)
    else:
        qmin, qmax = _grid(encoding)
        inv = torch.where(s > 0, 1.0 / s.clamp(min=1e-30), torch.zeros_like(s))  # s == 0: all-zero block
        d = torch.mul(blocks, inv).round_()
        if z is not None:
            d.add_(z)
        d.clamp_(qmin, qmax)
        if z is not None:
            d.sub_(z)
        d.mul_(s)
    d.sub_(blocks).square_()
    if importance is not None:
        d.mul_(importance)
    return d.sum(dim=-1)


def clip_search(blocks: torch.Tensor, encoding: str, importance: torch.Tensor | None = None,
                grid: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """Best clip ratio per block. blocks (..., B) float32; importance broadcastable to blocks (e.g. E[x_k^2]
    of the input channel, so that the search minimises expected output error) or None. Returns (...)."""
    lo = blocks.amin(dim=-1, keepdim=True)
    hi = blocks.amax(dim=-1, keepdim=True)
    amax = torch.maximum(-lo, hi)
    best_err = torch.full(blocks.shape[:-1], float("inf"), device=blocks.device)
    best = torch.ones(blocks.shape[:-1], device=blocks.device)
    for r in grid:  # ~21 vectorised passes over the whole weight; no loop over blocks
        err = _block_error(blocks, lo * r, hi * r, amax * r, encoding, importance)
        better = err < best_err  # strict: ties keep the larger ratio (1.0 first), i.e. plain absmax
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def mse_clip_ratio(w: torch.Tensor, encoding: str, block_size: int) -> torch.Tensor:
    """Data-free clip ratios for `quantize(w, encoding, block_size, clip_ratio=...)`.

    w (N, K) float -> (N, Kp/B) float32 ratios in [0.5, 1]: per block, the ratio of the grid 0.5..1.0 that
    minimises the block's squared reconstruction error. Ratio 1.0 (plain absmax) is always a candidate, so the
    error is never worse than absmax's (up to float16 rounding of the stored scale). Processed in row chunks
    to bound memory (about 4 weight-sized float32 temporaries per chunk).
    """
    if w.dim() != 2:
        raise QuantError(f"mse_clip_ratio: expected a 2-D weight, got shape {tuple(w.shape)}")
    _grid(encoding)
    if encoding == "int8_sym":
        # 255 levels: clipping almost never pays, and INT8 is already within noise of BF16.
        n, k = w.shape
        return torch.ones(n, -(-k // block_size), device=w.device)
    out = []
    rows = max(1, (1 << 22) // max(1, w.shape[1]))  # ~4M elements a chunk
    for i in range(0, w.shape[0], rows):
        out.append(clip_search(_pad_blocks(w[i:i + rows], block_size), encoding))
    return torch.cat(out, dim=0)


# ------------------------------------------------------------------------------------------------ GPTQ

def _ranges(blocks: torch.Tensor, ratio: torch.Tensor | float, encoding: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped (min, max, absmax) of blocks (..., B) -> each (..., 1)."""
    r = ratio if isinstance(ratio, float) else ratio.unsqueeze(-1)
    lo = blocks.amin(dim=-1, keepdim=True) * r
    hi = blocks.amax(dim=-1, keepdim=True) * r
    return lo, hi, torch.maximum(-lo, hi)


def _stored_params(lo: torch.Tensor, hi: torch.Tensor, amax: torch.Tensor, encoding: str,
                   scale_dtype: torch.dtype, double_quant: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """(N, nb, 1) ranges -> effective (N, nb, 1) scale and zero exactly as the file will hold them, plus
    the scale parts. Zero points are computed against the effective scale, as quantize() does."""
    s, _ = scale_zero(lo, hi, amax, encoding)
    s_eff, sparts = _store_scales(s.squeeze(-1), scale_dtype, double_quant)
    s_eff = s_eff.unsqueeze(-1)
    z = None
    if encoding == "int4_asym":
        safe = torch.where(s_eff > 0, s_eff, torch.ones_like(s_eff))
        z = torch.round(-lo.clamp(max=0) / safe).clamp(0, 15)
    return s_eff, z, sparts


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, encoding: str = "int4_sym", block_size: int = 128,
                  scale_dtype: torch.dtype = torch.float16, double_quant: bool = False,
                  act_order: bool = False, damp: float = 0.01, clip: bool = True,
                  static_groups: bool = False, name: str = "weight") -> QuantizedTensor:
    """GPTQ one linear weight w (N, K) given H = sum over calibration tokens of x x^T, (K, K).

    Processes input columns left to right (or by decreasing diag(H) with act_order), rounding each column and
    moving its error onto the columns still to come: err_j = (w_j - q_j) / [H^-1]_jj, W[:, j+1:] -= err_j
    [H^-1]_{j, j+1:}, using the upper Cholesky factor of H^-1 (the paper's stable form) and lazy batches of
    128 columns so most of the work is one matmul per batch.

    Scales stay per block of `block_size` *contiguous original* columns, so the result is the ordinary
    layout. Without act_order each block's scale is chosen when the sweep reaches it (from the already
    error-corrected weights, the better choice); with act_order, double_quant or static_groups all scales
    are chosen up front from w, and act_order only changes the order in which codes are picked, undone before
    storing. clip=True picks each block's scale with the clip search weighted by diag(H).
    """
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise QuantError(f"{name}: weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} do not match")
    _grid(encoding)
    n, k = w.shape
    B = block_size
    nb = -(-k // B)
    kp = nb * B
    dev = w.device
    W = torch.zeros(n, kp, device=dev, dtype=torch.float32)
    W[:, :k] = w.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise QuantError(f"{name}: weight holds NaN or Inf values; refusing to quantize it")
    H = torch.zeros(kp, kp, device=dev, dtype=torch.float32)
    H[:k, :k] = hessian.to(torch.float32)

    # Input channels never seen active (and the padding) carry no information: weight 0, identity row.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diag(H).clone()  # E[x_k^2] up to a constant: weights the clip search

    static = act_order or double_quant or static_groups
    S = torch.zeros(n, nb, 1, device=dev)
    Z = torch.zeros(n, nb, 1, device=dev) if encoding == "int4_asym" else None
    sparts: dict[str, torch.Tensor] = {}
    if static:
        blocks = W.reshape(n, nb, B)
        ratio = clip_search(blocks, encoding, importance.reshape(nb, B)) if clip else 1.0
        S, Z, sparts = _stored_params(*_ranges(blocks, ratio, encoding), encoding, scale_dtype, double_quant)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(kp, device=dev)
    W = W[:, perm]
    H = H[perm][:, perm]
    group = (perm // B).tolist()  # the block each (permuted) column's scale belongs to; host ints: no syncs

    H += torch.eye(kp, device=dev) * (damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise QuantError(f"{name}: calibration Hessian is not positive definite; raise the damping") from e

    Q = torch.zeros(n, kp, device=dev)  # integer codes, permuted order
    lazy = max(128, B)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % B == 0:
                # Choose this block's scale now, from the error-corrected weights (static is False only
                # without act_order, so columns j..j+B-1 are block j // B and lie inside W1).
                blk = W1[:, i:i + B].unsqueeze(1)  # (N, 1, B)
                ratio = clip_search(blk, encoding, importance[j:j + B]) if clip else 1.0
                s, z, _ = _stored_params(*_ranges(blk, ratio, encoding), encoding, scale_dtype, False)
                S[:, j // B] = s[:, 0]
                if Z is not None:
                    Z[:, j // B] = z[:, 0]
            g = group[j]
            s = S[:, g]  # (N, 1)
            z = Z[:, g] if Z is not None else None
            col = W1[:, i:i + 1]
            q = codes(col, s, z, encoding)
            Q[:, j:j + 1] = q
            err = (col - decode(q, s, z, encoding)) / Hinv1[i, i]
            W1[:, i:] -= err * Hinv1[i:i + 1, i:]
            Err[:, i:i + 1] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]

    Q = Q[:, torch.argsort(perm)]  # back to the stored (original) column order
    if not static:
        sparts = {"scales": S.squeeze(-1).to(scale_dtype).contiguous()}  # already scale_dtype-rounded
    parts: dict[str, torch.Tensor] = {}
    if encoding == "int8_sym":
        parts["qweight"] = Q.to(torch.int8).contiguous()
    else:
        parts["qweight"] = pack_int4(Q.to(torch.int16))
    parts.update(sparts)
    if Z is not None:
        parts["zeros"] = Z.squeeze(-1).to(torch.uint8).contiguous()
    return QuantizedTensor(encoding, (n, k), B, {p: t.cpu() for p, t in parts.items()})


# ------------------------------------------------------------------------------ calibration over a model

CALIB_CTX = 512  # tokens per calibration window
DEFAULT_CALIB_TOKENS = 16384  # 32 windows: enough for stable Hessians of a small model, minutes on a CPU
DATA_FREE_TOKENS = 4096  # random-token calibration (text_path=None): what docs/QUALITY.md measured
ACT_ORDER = True
DAMP = 0.01
EMBED_GPTQ = True  # tied embeddings, when quantized: GPTQ in the lm_head role (else the data-free clip search)

# The HF linears of one decoder layer, grouped by the input they read (one Hessian per group), and the
# model module whose input that is.
_GROUPS = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_up_proj.proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)


def read_calibration_tokens(tokenizer, text_path: str, n_tokens: int, ctx: int) -> torch.Tensor:
    """The first n_tokens tokens of the file, cut into whole windows: (windows, ctx) long."""
    from qrun.errors import QRunError
    from qrun.runtime.evaluate import read_text
    ids = tokenizer.encode(read_text(text_path), add_special_tokens=False)[:n_tokens]
    if len(ids) < ctx:
        raise QRunError(f"{text_path}: the calibration text has {len(ids)} tokens, fewer than one window of "
                        f"{ctx}; give a longer text")
    n = len(ids) // ctx
    return torch.tensor(ids[: n * ctx], dtype=torch.long).reshape(n, ctx)


def _layer(args, src, i: int, device) -> torch.nn.Module:
    """Decoder layer i of the model (qrun/models/llama.py) with its BF16 weights from `src`, float32."""
    from qrun.models.llama import TransformerBlock
    p = f"model.layers.{i}."
    g = lambda n: src.get(p + n).to(device=device, dtype=torch.float32)  # noqa: E731
    block = TransformerBlock(args).to(device)
    sd = {
        "input_layernorm.weight": g("input_layernorm.weight"),
        "post_attention_layernorm.weight": g("post_attention_layernorm.weight"),
        "self_attn.qkv_proj.weight": torch.cat([g(f"self_attn.{x}_proj.weight") for x in "qkv"]),
        "self_attn.o_proj.weight": g("self_attn.o_proj.weight"),
        "mlp.gate_up_proj.proj.weight": torch.cat([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")]),
        "mlp.down_proj.weight": g("mlp.down_proj.weight"),
    }
    if args.qkv_bias:
        sd["self_attn.qkv_proj.bias"] = torch.cat([g(f"self_attn.{x}_proj.bias") for x in "qkv"])
    if args.o_bias:
        sd["self_attn.o_proj.bias"] = g("self_attn.o_proj.bias")
    block.load_state_dict(sd, strict=True, assign=True)
    return block.eval()


def _run(block, x: torch.Tensor, cos, sin, mask, batch: int) -> torch.Tensor:
    """x (W, T, D) -> layer output (W, T, D), a few windows at a time to bound the MLP's activations."""
    return torch.cat([block(x[j:j + batch], cos, sin, mask, None) for j in range(0, x.shape[0], batch)])


def calibrate(src, text_path: str | None, opts, calib_tokens: int | None = None, progress: bool = True,
              device: str | torch.device | None = None, act_order: bool = ACT_ORDER, damp: float = DAMP,
              ctx: int = CALIB_CTX, embed_gptq: bool = EMBED_GPTQ) -> dict[str, QuantizedTensor]:
    """GPTQ-quantize every linear weight of `src` (a converter Source) on calibration text.

    text_path=None calibrates on seeded random token ids instead of text: a data-free mode.

    Returns {HF tensor name: QuantizedTensor} for `convert(..., quantized=)`. One decoder layer at a time:
    its float32 weights, the activations of all calibration windows entering it (W, T, D), and one Hessian
    per input (K, K) are all that is alive. An untied lm_head gets GPTQ on the final hidden states; a
    quantized embedding table gets the data-free clip search, or, when tied and embed_gptq, GPTQ in its
    lm_head role.
    """
    from tqdm import tqdm

    from qrun.errors import QRunError
    from qrun.models.llama import ModelArgs, rope_tables
    from qrun.quant import dequantize, quantize
    from qrun.runtime.convert import tensor_encoding
    from qrun.runtime.tokenizer import Tokenizer

    if opts.bits == 16:
        raise QRunError("--calibrate needs --bits 4 or 8 (there is nothing to calibrate at 16 bits)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale_dtype = torch.float16 if opts.scale_dtype == "float16" else torch.float32
    args = ModelArgs.from_config(src.config)
    n_tokens = calib_tokens or (DEFAULT_CALIB_TOKENS if text_path is not None else DATA_FREE_TOKENS)
    if text_path is None:
        # Data-free: uniformly random token ids (seeded). Far from real text, yet enough to show GPTQ which
        # input channels are large and how they correlate inside the network.
        g = torch.Generator().manual_seed(0)
        vocab = min(args.vocab_size, Tokenizer(src.files, "source").vocab_size)
        tokens = torch.randint(0, vocab, (max(1, n_tokens // ctx), ctx), generator=g)
    else:
        tokens = read_calibration_tokens(Tokenizer(src.files, "source"), text_path, n_tokens, ctx)
    names = set(src.names())

    def encoding_of(name: str) -> str | None:
        return tensor_encoding(name, src.shape(name), src.dtype(name), opts) if name in names else None

    def gptq(name: str, w: torch.Tensor, H: torch.Tensor, enc: str) -> QuantizedTensor:
        return gptq_quantize(w, H, enc, opts.block_size, scale_dtype, opts.double_quant, act_order=act_order,
                             damp=damp, name=name)

    out: dict[str, QuantizedTensor] = {}
    emb = src.get("model.embed_tokens.weight")
    x = emb[tokens].to(device=device, dtype=torch.float32)  # (W, T, D): activations entering layer 0
    emb_enc = encoding_of("model.embed_tokens.weight")
    tied_gptq = emb_enc is not None and "lm_head.weight" not in names and embed_gptq
    if emb_enc is not None and not tied_gptq:
        w = emb.to(device=device, dtype=torch.float32)
        out["model.embed_tokens.weight"] = quantize(w, emb_enc, opts.block_size, scale_dtype, opts.double_quant,
                                                    clip_ratio=mse_clip_ratio(w, emb_enc, opts.block_size))
    del emb
    cos, sin = rope_tables(args, ctx, device)
    mask = torch.ones(ctx, ctx, dtype=torch.bool, device=device).tril()
    batch = 4 if device.type == "cpu" else 32

    bar = tqdm(range(args.n_layers), desc="calibrate (GPTQ)", unit="layer", disable=not progress)
    with torch.no_grad():
        for i in bar:
            block = _layer(args, src, i, device)
            modules = dict(block.named_modules())
            H = {m: None for m, _ in _GROUPS}

            def hook(mod_name):
                def f(_module, args, kwargs):
                    a = args[0]
                    if kwargs.get("norm") is not None:  # the model hands the RMSNorm to the linear to fuse
                        a = kwargs["norm"](a)
                    a = a.reshape(-1, a.shape[-1]).to(torch.float32)  # (tokens, K): what the weight sees
                    H[mod_name] = a.T @ a if H[mod_name] is None else H[mod_name].addmm_(a.T, a)
                return f
            handles = [modules[m].register_forward_pre_hook(hook(m), with_kwargs=True) for m, _ in _GROUPS]
            _run(block, x, cos, sin, mask, batch)  # collect the Hessians
            for h in handles:
                h.remove()

            # Quantize each HF linear with its input's Hessian; put the dequantized weight back into the
            # fused module so the next pass sees exactly what the kernels will compute.
            for mod_name, hf in _GROUPS:
                fused = modules[mod_name].weight
                row = 0
                for short in hf:
                    name = f"model.layers.{i}.{short}.weight"
                    n = src.shape(name)[0]
                    enc = encoding_of(name)
                    if enc is not None:
                        qt = gptq(name, fused[row:row + n], H[mod_name], enc)
                        out[name] = qt
                        fused[row:row + n] = dequantize(qt).to(device)
                    row += n
            del H
            x = _run(block, x, cos, sin, mask, batch)  # the quantized layer's outputs feed the next layer
            del block

        # The output projection: an untied lm_head, or (tied) the embedding table in its lm_head role,
        # GPTQ'd on the final hidden states (the logits are what perplexity sees; the lookup role only
        # needs each row close, which GPTQ keeps to about RTN's error).
        head = "lm_head.weight" if "lm_head.weight" in names else ("model.embed_tokens.weight" if tied_gptq
                                                                  else None)
        if head is not None and encoding_of(head) is not None:
            from qrun.models.llama import RMSNorm
            norm = RMSNorm(args.dim, args.norm_eps).to(device)
            norm.weight.copy_(src.get("model.norm.weight").to(torch.float32))
            h = norm(x).reshape(-1, args.dim)
            out[head] = gptq(head, src.get(head).to(device, torch.float32), h.T @ h, encoding_of(head))
    bar.close()
    return out
