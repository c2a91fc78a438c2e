"""Launchers for the Triton kernels and their torch.library custom ops (qrun::quant_linear,
qrun::quant_linear_silu_mul), so torch.compile treats them as opaque calls and CUDA graphs capture them.

Dispatch by M (rows of x): M == 1 -> gemv_tc16_kernel (int4 in the "tc16" layout, tensor cores),
gemv_il4_kernel or gemv_il4_mma_kernel (int4, "il4": the word GEMV or the tensor-core one, the tuner picks per
shape), gemv_int4_kernel (int4 "rows", packed bytes read as int32 words) or
gemv_kernel (int8, nf4), M >= 2 -> gemm_kernel (tl.dot; M <= 16 pads the MMA
to 16). Launch configs are timed once per (device, kernel, encoding, block size, dtype, N, K, M bucket) and
cached for the process; under CUDA graph capture an untuned shape takes the first candidate (timing is
impossible there), so warm up before capturing.
Under TRITON_INTERPRET=1 (CPU tests) the first candidate is used with no timing.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

from qrun.quant import NF4_CODE

from .gemm import gemm_kernel
try:  # Gluon (triton >= 3.5); the launcher falls back to gemm_kernel without it
    from .gemm_wg import descriptors as wg_descriptors, gemm_il4_wg_kernel, gemm_il4_ws_kernel
except ImportError:  # pragma: no cover - depends on the installed triton
    gemm_il4_wg_kernel = gemm_il4_ws_kernel = wg_descriptors = None
from .gemv import gemv_kernel
from .gemv4 import gemv_int4_kernel
from .gemv_il import gemv_il4_kernel
try:  # Gluon; without it the il4 GEMV runs alone at M = 1
    from .gemv_mma import gemv_il4_mma_kernel
except ImportError:  # pragma: no cover - depends on the installed triton
    gemv_il4_mma_kernel = None
from .gemv_tc import gemv_tc16_kernel
from .layout import LAYOUTS, can_tc16
from . import tune_cache
from .pdl import pdl_kwargs, pdl_trigger_kwargs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TUNE = os.environ.get("QRUN_KERNEL_TUNE", "1") != "0"  # 0: take the first candidate config (fast tests)
FUSE = os.environ.get("QRUN_FUSE_NORM", "1") != "0"  # 0: RMSNorm and residual outside the word GEMV (A/B timing)
# RMSNorm / residual are fused into the word GEMVs up to this many weights (N x K), by default always.
# History (H100, docs/PERF.md): with the canonical layout, fusing made Qwen2.5-7B's layer GEMVs ~2 us slower
# each (251.6 vs 264.6 tok/s), so it was capped at 12 M weights. Those shapes now take the il4 GEMV, which
# fuses at no cost (7B 387 -> 405 tok/s fused), and the one large canonical GEMV left in the measured models,
# Qwen2-0.5B's tied int4 lm_head, gains from it too (1694 -> 1768 tok/s; benchmarks/decode.py --runs
# graph,fuse). QRUN_FUSE_MAX_WEIGHTS sets a cap again for A/B timing.
FUSE_MAX_WEIGHTS = int(os.environ.get("QRUN_FUSE_MAX_WEIGHTS", 10**15))
# 1: gate+up on tc16 at M > 1 through the fused SILU GEMM (wrong rows seen on the H100; for diagnosis only)
TC16_SILU_GEMM = os.environ.get("QRUN_TC16_SILU_GEMM", "0") == "1"
PDL_MAX_K = int(os.environ.get("QRUN_PDL_MAX_K", 8192))  # the il4 GEMV is launched without PDL from this K on
# 1 (default): the GEMM drops its load masks where M, N and K are whole tiles (gemm.py EVEN). H100, round 10
# call 2 (docs/PERF.md attempt 48): every M = 1024 config right on it, and 7B gate+up 687 -> 641 us, the other
# shapes the same or up to 4% faster. 0 keeps the masks (A/B timing).
GEMM_EVEN = os.environ.get("QRUN_GEMM_EVEN", "1") == "1"
# 1 (default): the Gluon GEMM (gemm_wg.py: il4 int4, M > 64, sm_90) joins the configs timed for the GEMM. 0 leaves
# it out (A/B timing).
GEMM_WG = os.environ.get("QRUN_GEMM_WG", "1") == "1"
# 1 (default): the tensor-core GEMV (gemv_mma.py: il4 int4, blocks of 128, M = 1, sm_90) joins the il4 GEMV's
# configs; 0 leaves it out (A/B timing); 2 puts its configs first, so that untuned launches (QRUN_KERNEL_TUNE=0,
# the GPU tests) take it.
GEMV_MMA = os.environ.get("QRUN_GEMV_MMA", "1") in ("1", "2")
GEMV_MMA_FIRST = os.environ.get("QRUN_GEMV_MMA") == "2"
TUNE_LOG = os.environ.get("QRUN_TUNE_LOG", "0") == "1"  # 1: the chain tuner prints each candidate's time to stderr
# 1 (default): with it, its warp-specialized variant (gemm_wg.gemm_il4_ws_kernel); 0 leaves that out.
GEMM_WS = os.environ.get("QRUN_GEMM_WS", "1") == "1"

_tuned: dict[tuple, dict] = {}
LAST: dict[str, object] = {}  # kernel kind -> last CompiledKernel launched (benchmark diagnostics)
_code_tables: dict[torch.device, torch.Tensor] = {}


def _code_table(device: torch.device) -> torch.Tensor:
    t = _code_tables.get(device)
    if t is None:
        t = _code_tables[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return t


def _untimed(key: tuple, candidates: list[dict]) -> dict | None:
    """The config to use without timing: this process's pick, or the first candidate where timing is off or
    pointless (the interpreter, a single candidate), or a pick stored by an earlier process (tune_cache), or
    the first candidate where timing is impossible (graph capture); None when the candidates must be timed."""
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    if not TUNE or INTERPRET or len(candidates) == 1:
        return candidates[0]
    cfg = tune_cache.get(_device_name(key[0]), repr(key[1:]), candidates)  # a pick an earlier process made
    if cfg is not None:
        _tuned[key] = cfg
        return cfg
    return candidates[0] if torch.cuda.is_current_stream_capturing() else None


def _device_name(index) -> str:
    return torch.cuda.get_device_name(index)


def _remember(key: tuple, cfg: dict) -> None:
    """Keep a timed pick for this process and, through tune_cache, for later ones."""
    _tuned[key] = cfg
    tune_cache.put(_device_name(key[0]), repr(key[1:]), cfg)


def _pick(key: tuple, candidates: list[dict], launch) -> dict:
    """The fastest of `candidates` for `key` (timed once), launching each through launch(cfg)."""
    cfg = _untimed(key, candidates)
    if cfg is not None:
        return cfg
    from triton.testing import do_bench
    best, best_t = candidates[0], float("inf")
    for c in candidates:
        try:
            t = do_bench(lambda: launch(c), warmup=5, rep=20, return_mode="median")
        except Exception:  # a config the compiler rejects (e.g. out of shared memory) is skipped
            continue
        if t < best_t:
            best, best_t = c, t
    _remember(key, best)
    return best


# ------------------------------------------------------------------ picks, for tuning in the decode step
GEMV_KINDS = ("gemv_il4", "gemv_il4_rope", "gemv_tc16", "gemv4", "gemv")  # the M = 1 launchers' tuner keys


def gemv_keys() -> list[tuple]:
    """The tuner keys of the M = 1 GEMVs this process has launched (and so picked a config for): (device,
    kind, encoding, block size, x dtype, scale dtype, N, K, bias, silu, norm, residual, layout)."""
    return [k for k in _tuned if k[1] in GEMV_KINDS]


def gemv_candidates(key: tuple) -> list[dict]:
    """The configs the launcher offers for a key of gemv_keys()."""
    kind, enc, bs, k = key[1], key[2], key[3], key[7]
    nb = triton_cdiv(k, bs)
    if kind == "gemv_il4":
        return _il4_candidates(nb, mma=_mma_ok(key[0], enc, bs, key[4]))
    if kind == "gemv_il4_rope":
        return _il4_candidates(nb, IL4_ROPE_TABLE)
    if kind == "gemv_tc16":
        return _tc16_candidates()
    if kind == "gemv4":
        return _gemv4_candidates(bs, nb)
    if kind == "gemv":
        return _gemv_candidates(enc, bs, nb)
    raise ValueError(f"not a GEMV key: {key!r}")


def get_config(key: tuple) -> dict:
    return _tuned[key]


def set_config(key: tuple, cfg: dict, store: bool = False) -> None:
    """Launches of key use cfg from now on in this process; store: also in the on-disk cache (tune_cache),
    for later processes on this GPU."""
    if cfg not in gemv_candidates(key):
        raise ValueError(f"{cfg} is not a candidate config for {key!r}")
    if store:
        _remember(key, cfg)
    else:
        _tuned[key] = cfg


# weight bytes a chain-timed tuning graph walks through: > 3x the H100's 50 MB L2. Until round 17 the copies were
# capped at 16, so the 0.5B shapes' chains (0.4-4.5 MB a copy) ran from L2 and the picks suited L2-resident
# weights; with the cap at 256 the untuned 0.5B decode went from 1595-1615 to 1911 tok/s on the H100
# (docs/PERF.md attempt 82)
CHAIN_BYTES = 160e6


def _scrambled(t):
    """A tensor like t (shape, dtype, device) holding random bytes: weight copies for timing only."""
    if t.dtype.is_floating_point:
        return torch.rand_like(t, dtype=torch.float32).mul_(0.02).to(t.dtype)
    return torch.randint(0, 16, t.shape, dtype=t.dtype, device=t.device) if t.dtype == torch.uint8 else \
        torch.randint(-2**31, 2**31 - 1, t.shape, dtype=t.dtype, device=t.device)


def _pick_chain(key: tuple, candidates: list[dict], launch, parts: tuple) -> dict:
    """The fastest of `candidates` timed the way the decode step runs a GEMV: one CUDA graph of back-to-back
    launches (with their PDL edges), each on its own copy of the weight parts (random bytes; enough copies
    that L2 cannot serve them). launch(cfg, w, s, z) launches on the given parts.
    Why not do_bench: it times each launch alone behind an L2 flush, and on the H100 its picks were up to
    25% slower in a graph chain than the chain's best config (PERF.md round 4, attempt 18), which made decode
    speed vary between processes. Falls back to do_bench if the copies do not fit in memory."""
    cfg = _untimed(key, candidates)
    if cfg is not None:
        return cfg
    nbytes = sum(t.numel() * t.element_size() for t in parts)
    try:
        copies = [parts] + [tuple(_scrambled(t) for t in parts)
                            for _ in range(max(1, min(255, int(CHAIN_BYTES // max(nbytes, 1)))))]
    except torch.cuda.OutOfMemoryError:
        return _pick(key, candidates, lambda c: launch(c, *parts))
    import statistics
    best, best_t = candidates[0], float("inf")
    stream = torch.cuda.Stream()
    for c in candidates:
        try:
            for p in copies[:2]:  # compile and warm up outside the capture
                launch(c, *p)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.graph(g, stream=stream):
                for _ in range(2):
                    for p in copies:
                        launch(c, *p)
            times = []
            for _ in range(7):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                g.replay()
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1))
            t = statistics.median(times[1:])
            del g
        except Exception:  # a config the compiler rejects is skipped
            torch.cuda.synchronize()
            continue
        if TUNE_LOG:
            print(f"qrun tune: {key[1:]} {c}: {t * 1e3 / (2 * len(copies)):.2f} us a call", file=sys.stderr,
                  flush=True)
        if t < best_t:
            best, best_t = c, t
    del copies
    _remember(key, best)
    return best


def _check(x, qweight, scales, zeros, encoding, block_size, in_features):
    n, nb = scales.shape
    kp = nb * block_size
    if x.shape[-1] != in_features or in_features > kp:
        raise ValueError(f"x has {x.shape[-1]} features; the weight expects {in_features} (padded {kp})")
    per_byte = 1 if encoding == "int8_sym" else 2
    if tuple(qweight.shape) != (n, kp // per_byte):
        raise ValueError(f"{encoding} qweight shape {tuple(qweight.shape)} != {(n, kp // per_byte)}")
    if encoding == "int4_asym" and (zeros is None or zeros.shape != scales.shape):
        raise ValueError("int4_asym needs zeros shaped like the scales")
    for t in (qweight, scales) + ((zeros,) if zeros is not None else ()):
        if t.stride(-1) != 1:
            raise ValueError("quantized parts must be contiguous along K")


def _gemv_candidates(encoding, block_size, nb):
    hb = block_size if encoding == "int8_sym" else block_size // 2
    out = []
    # (rows, packed bytes per row per step, warps, stages): 16 to 64 bytes per thread per step
    for bn, row_bytes, warps, stages in ((8, 512, 4, 2), (16, 512, 4, 2), (8, 1024, 4, 2), (4, 1024, 4, 3),
                                         (16, 256, 4, 3), (32, 256, 8, 2), (16, 1024, 8, 2), (8, 256, 4, 4)):
        g = max(1, row_bytes // hb)
        g = min(g, triton_next_pow2(nb))
        c = dict(BLOCK_N=bn, G=g, num_warps=warps, num_stages=stages)
        if c not in out:
            out.append(c)
    return out


def _gemv_pdl(x2: torch.Tensor, k: int) -> dict:
    """Launch keywords of a decode GEMV over K inputs: PDL (pdl.py), except from PDL_MAX_K on (see _launch)."""
    return pdl_trigger_kwargs(x2) if k >= PDL_MAX_K else pdl_kwargs(x2, gemv=True)


def _il4_scratch(progs: int, c: dict, device, dummy: torch.Tensor):
    """Split-K partials and arrival counters of an il4 launch of `progs` row-group programs (dummies unsplit)."""
    split = c.get("SPLIT", 1)
    if split == 1:
        return dummy, dummy
    return (torch.empty(progs * split * (8 * c["R4"] + 1), dtype=torch.float32, device=device),
            _tile_counters(device, progs))


def _il4_blocks_per_split(nb: int, c: dict) -> int:
    """Quantization blocks of K per program of a row group: all nb, or with SPLIT programs a multiple of the
    step (G blocks), so that no step straddles two programs."""
    split = c.get("SPLIT", 1)
    return nb if split == 1 else triton_cdiv(triton_cdiv(nb, split), c["G"]) * c["G"]


# (R4, G, DEEP, SPLIT, PF): _il4_candidates' docstring says what each is
IL4_TABLE = ((1, 2, 0, 1, 0), (1, 4, 0, 1, 0), (2, 4, 0, 1, 0), (1, 8, 0, 1, 0), (2, 2, 0, 1, 0), (1, 16, 0, 1, 0),
             (1, 2, 1, 1, 0), (1, 4, 1, 1, 0), (1, 8, 1, 1, 0), (1, 16, 1, 1, 0), (1, 4, 0, 2, 0), (1, 4, 1, 2, 0),
             (1, 8, 0, 2, 0), (1, 2, 1, 2, 0), (1, 4, 0, 3, 0), (1, 4, 1, 3, 0), (1, 2, 0, 4, 0), (1, 4, 0, 4, 0),
             (1, 2, 0, 1, 1), (1, 4, 0, 1, 1), (2, 4, 0, 1, 1), (1, 8, 0, 1, 1), (1, 4, 0, 2, 1), (1, 2, 0, 4, 1),
             (1, 4, 0, 1, 4), (1, 8, 0, 1, 4), (1, 2, 0, 1, 8), (2, 2, 0, 2, 0), (2, 2, 0, 4, 0), (1, 4, 1, 4, 0))
IL4_ROPE_TABLE = ((2, 4, 0, 1, 0), (2, 2, 0, 1, 0), (2, 4, 1, 1, 0), (2, 2, 1, 1, 0), (2, 2, 0, 2, 0),
                  (2, 2, 1, 2, 0), (2, 2, 0, 4, 0))  # R4 2 and no prefetch: what ROPE (gemv_il.py) runs


# The tensor-core GEMV (gemv_mma.py): (warps, SPLIT programs a row set along K, AHEAD blocks of weights in flight).
# Round 16 (H100, kernels.py --sweep, docs/PERF.md attempt 78): 4 warps split 4 or 8 ways won 7B qkv, o and down;
# gate+up stays with the il4 GEMV (~10% slower here, with any of these configs). Round 17 (attempt 82): one
# program a row set with both steps loaded ahead runs 0.5B gate+up (7 blocks) in 3.8 us against il4's 4.2, and took
# the place of (8, 2, 2), which won no shape. Five configs: each costs a compile and a timing per shape in a cold
# process's warm-up.
MMA_TABLE = ((4, 1, 2), (4, 4, 1), (4, 4, 2), (4, 8, 1), (8, 4, 1))
MMA_SMEM_MAX = 96 * 1024  # its staged x: steps x warps x 256 bytes
MMA_KNOCK = int(os.environ.get("QRUN_MMA_KNOCK", "0"))  # timing only: a stage of its loop left out (gemv_mma.py)


def _mma_ok(dev: int, encoding: str, block_size: int, x_dtype) -> bool:
    """Whether gemv_il4_mma_kernel can run an M = 1 il4 call: int4 with blocks of 128, bf16 or fp16 x, sm_90 (the
    GPU it is tested on), Gluon present."""
    return (gemv_il4_mma_kernel is not None and GEMV_MMA and not INTERPRET and dev >= 0
            and encoding in ("int4_sym", "int4_asym") and block_size == 128
            and x_dtype in (torch.bfloat16, torch.float16) and torch.cuda.is_available()
            and _capability(dev)[0] == 9)


def _mma_candidates(nb):
    out = []
    for w, sp, ahead in MMA_TABLE:
        nbs = triton_cdiv(nb, sp)
        if sp == 1 and nb > 2 * w:
            continue  # one program a row set walks K alone: only for short K (0.5B's 896); 7B's lm_head (K = 3584)
            # picked it in round 17's chain and ran 7% slower in kernels.py than round 16's il4 pick
        if sp > 1 and (sp - 1) * nbs >= nb:
            continue  # a program with nothing to do
        if triton_cdiv(nbs, w) * w * 256 > MMA_SMEM_MAX:
            continue
        out.append(dict(MMA=True, SPLIT=sp, AHEAD=ahead, num_warps=w))
    return out


def _il4_candidates(nb, table=IL4_TABLE, mma=False):
    """(R4 groups of 4 rows, G blocks per step, DEEP, SPLIT, PF, warps = G * 16 threads / 32): few row groups and
    short steps give many programs for short K; long K (down projections) needs more warps per program along
    K. DEEP: three steps of weights in flight per thread instead of two. SPLIT: programs per row group along K,
    which multiplies the bytes in flight per SM for shapes with few rows (7B down and o, 0.5B); only where every
    program gets at least one step. PF: L2 prefetch (l2.py) of the program's whole share (1) or of a window
    PF steps ahead; its variants are new in round 9 (docs/PERF.md), so the tuner decides. The last two (8 rows a
    program, split along K: half the x loads per weight byte of R4 1, for 7B down) came next. The last (round 11:
    split 4 and DEEP, so 8 of a program's 12 blocks are loaded before its wait) is the fastest on 0.5B down's 224
    row groups of 38 blocks (docs/PERF.md attempt 58); two like it with G = 8 won nowhere and were dropped."""
    out = []
    for r4, g, deep, sp, pf in table:
        g = min(g, triton_next_pow2(nb))
        c = dict(R4=r4, G=g, DEEP=bool(deep), SPLIT=sp, PF=pf, num_warps=max(1, g // 2), num_stages=1)
        if sp > 1 and (sp - 1) * _il4_blocks_per_split(nb, c) >= nb:
            continue  # a program with nothing to do
        if pf > 1 and pf * g >= nb:
            continue  # a window past the end: the same as PF 1
        if c not in out:
            out.append(c)
    if mma:
        out = _mma_candidates(nb) + out if GEMV_MMA_FIRST else out + _mma_candidates(nb)
    if INTERPRET:  # QRUN_IL4_SPLIT: the interpreter tests' way to run the split-K path
        out = [dict(R4=2, G=2, DEEP=True, SPLIT=int(os.environ.get("QRUN_IL4_SPLIT", 1)), PF=0, num_warps=1,
                    num_stages=1)]
    return out


TC16_ALL = os.environ.get("QRUN_TC16_ALL", "0") == "1"
_counters: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """int32 arrival counters, one per 16-row tile (tc16) or program (il4), shared by every split-K GEMV
    launch on the device: each kernel leaves them at zero, and launches on one stream do not overlap where
    they touch them (PDL lets a kernel start early, but it waits for its predecessor before its first counter
    access)."""
    t = _counters.get(device)
    if t is None or t.numel() < tiles:
        t = _counters[device] = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
    return t[:tiles]


def _tc16_candidates(every: bool | None = None):
    """(warps splitting K by quads of 64 k, DEEP: weights and x two steps ahead, CG: weights bypass L1). One
    program per 16-row tile, so many warps for enough loads in flight. First measured (H100, kernels.py
    --sweep, round 5): 16 warps best on 7B o and down, 4 warps 1.6-2.3x slower."""
    # The DEEP and CG variants (x two steps ahead, weights past L1) are written after the last device run and
    # not yet checked on a GPU: only with every=True / QRUN_TC16_ALL=1 (the GPU tests and kernels.py --sweep
    # take them all).
    # SPLIT (programs a tile along K, for shapes with fewer tiles than SMs) is not yet checked on a GPU either.
    every = TC16_ALL if every is None else every
    out = [dict(WARPS=w, DEEP=bool(d), CG=bool(cg), SPLIT=sp, num_warps=w, num_stages=1)
           for w, d, cg, sp in ((16, 0, 0, 1), (8, 0, 0, 1), (32, 0, 0, 1), (4, 0, 0, 1), (16, 1, 0, 1),
                                (8, 1, 0, 1), (16, 1, 1, 1), (8, 1, 1, 1), (16, 0, 0, 2), (16, 0, 0, 4),
                                (8, 0, 0, 4), (8, 0, 0, 8)) if every or not (d or cg or sp > 1)]
    if INTERPRET:  # QRUN_TC16_SPLIT: the interpreter tests' way to run the split-K path
        out = [dict(WARPS=2, DEEP=True, CG=True, SPLIT=int(os.environ.get("QRUN_TC16_SPLIT", 1)), num_warps=2,
                    num_stages=1)]
    return out


def _gemv4_candidates(block_size, nb):
    """(BLOCK_N rows per thread, K per step, warps, PER_SM): K per step = 32 * threads along K (one 16-byte
    load of 4 words = 32 k per thread per row), so every thread holds all BLOCK_N rows and the warps split K.
    PER_SM > 0: a persistent grid of PER_SM programs per SM streaming row block after row block.
    (A cp.async-pipelined K loop, tl.range(num_stages=2..4), measured 1.4-2.4x slower on the H100: PERF.md.)"""
    out = []
    # A sweep of 14 configs timed in CUDA graphs (benchmarks/kernels.py --sweep, H100) found every shape's
    # best few within 1% of each other, so the list is short: tuning time is paid at every cold start.
    for bn, kstep, warps, per_sm in ((4, 1024, 1, 0), (8, 1024, 1, 0), (4, 2048, 2, 0), (8, 2048, 2, 0),
                                     (4, 2048, 2, 8), (2, 1024, 1, 32)):
        g = max(1, min(kstep // block_size, triton_next_pow2(nb)))
        c = dict(BLOCK_N=bn, G=g, PER_SM=per_sm, num_warps=warps, num_stages=1)
        if c not in out:
            out.append(c)
    if INTERPRET:  # persistent, so that programs walk several row blocks (4 "SMs" on the CPU)
        out = [dict(BLOCK_N=4, G=2, PER_SM=1, num_warps=1, num_stages=1)]
    return out


_sms: dict[int, int] = {}


_sk_ws: dict[tuple, tuple] = {}


def _sk_workspace(device: torch.device, progs: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream-K GEMM's workspace (gemm_wg.gemm_il4_ws_kernel): a float32 tile slot and an arrival counter a
    program, zeros; the kernel leaves them zeros after every call, so one pair serves every call on a stream (its
    GEMMs run one after another). One pair a stream, so that GEMMs on two streams never share one."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, progs, tile)
    if key not in _sk_ws:
        _sk_ws[key] = (torch.zeros(progs * tile, dtype=torch.float32, device=device),
                       torch.zeros(progs, dtype=torch.int32, device=device))
    return _sk_ws[key]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so the persistent loop runs several row blocks each
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _sms:
        _sms[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _sms[i]


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# tc16 GEMM configs that gave wrong results on the H100 (triton 3.6): (BLOCK_N, BLOCK_K, SWAP, num_warps) at
# M > 64. At M = 1024, (128, 128 or 256, 64, SWAP, 8 warps) gave rel. err 1e-2 to inf on 7 of 8 shape runs
# (benchmarks/gemm_configs.py --ms 64,1024; PERF.md round 7, attempt 31); every other config was right.
TC16_BAD_GEMM = {(128, 64, True, 8)}


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _gemm_candidates(m, block_size, layout="rows", every=False):
    """The GEMM's configs for M rows (cached: the prefill calls this per linear, host-bound; the list and its
    dicts are shared, so callers copy before changing one)."""
    if INTERPRET:  # the tests change QRUN_GEMM_TILE between calls, and M's parity picks the orientation
        return _gemm_candidate_list(m, block_size, layout, every)
    return _gemm_candidates_cached(16 if m <= 16 else 64 if m <= 64 else 65, block_size, layout, every)


def _gemm_candidate_list(m, block_size, layout="rows", every=False):
    """every: also the configs known to be wrong on `layout` (gemm_configs.py looks at them)."""
    if m <= 16:
        cands = [(64, 16, 128, 4, 4), (128, 16, 128, 4, 3), (64, 16, 64, 4, 4), (128, 16, 64, 4, 4)]
    elif m <= 64:
        cands = [(128, 64, 128, 4, 3), (64, 64, 128, 4, 4), (128, 64, 64, 4, 4), (64, 32, 128, 4, 4)]
    else:  # both orientations: dequantized W as wgmma's register A operand (SWAP) or as B through smem
        # The last puts more warps a SM from independent CTAs (4 CTAs of 4 warps): ncu found the 128 x 256 tile's
        # one CTA of 8 warps a SM waiting at its CTA barriers 41% of the time (PERF.md attempt 52). Timed on the
        # H100 (attempt 54) it wins on 7B qkv and the gate+up shapes; 128 x 256 stays best on 7B o and down.
        # (64, 256, 64, 8, 3) and (128, 128, 64, 8, 4) won nowhere and were dropped.
        cands = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                 (256, 128, 64, 8, 3), (64, 128, 64, 4, 3)]
        cands = [c + (True,) for c in cands] + [(128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False),
                                                (256, 128, 64, 8, 3, False), (128, 128, 128, 8, 3, False)]
    out = []
    if m > 64 and layout == "il4" and GEMM_WG and not INTERPRET:
        # the Gluon GEMM (gemm_wg.py), first: (BLOCK_N, BLOCK_M, warps, x buffers). The launcher drops these
        # where the kernel does not apply (_wg_applies), and for gate+up those whose x buffers cannot hold the
        # float32 accumulator for the SILU epilogue (buffers x 32 < BLOCK_N).
        # Its warp-specialized variant (gemm_il4_ws_kernel) first of all: (BLOCK_N, BLOCK_M, x buffers, packed W
        # buffers, W buffers, ways: the tiles left over after the whole waves split up to that many ways, or 0:
        # one program a tile), 8 MMA warps and 4 dequantizing warps at 168 registers a thread (12 warps: the
        # register file's 65536 / 384).
        ws_cfgs = ((128, 256, 4, 6, 2, 4), (128, 256, 4, 6, 2, 0), (128, 256, 4, 6, 3, 4), (128, 256, 4, 6, 3, 0),
                   (128, 256, 4, 6, 3, 2)) if GEMM_WS else ()
        for bn, bm, st, qs, wst, sk in ws_cfgs:
            out.append(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=64, SWAP=True, num_warps=8, num_stages=st,
                            QSTAGES=qs, WSTAGES=wst, DQ_WARPS=4, maxnreg=168, SK=sk > 0, SK_WAYS=sk, WG=True,
                            WS=True))
        for bn, bm, warps, stages in ((128, 256, 8, 4), (128, 128, 8, 4), (128, 256, 8, 3), (64, 256, 4, 4),
                                      (128, 64, 8, 4)):
            out.append(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=64, SWAP=True, num_warps=warps, num_stages=stages,
                            WG=True))
    for bn, bm, bk, warps, stages, *swap in cands:
        bk = min(bk, block_size)  # one scale per row per K tile
        c = dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SWAP=swap[0] if swap else True, num_warps=warps,
                 num_stages=stages)
        if (layout == "tc16" and m > 64 and not every
                and (bn, bk, c["SWAP"], warps) in TC16_BAD_GEMM):
            continue
        if c not in out:
            out.append(c)
    if INTERPRET:  # small tiles keep the interpreter fast; QRUN_GEMM_TILE="BN,BK": the tests' way to run others
        bn, bk = (int(v) for v in os.environ.get("QRUN_GEMM_TILE", "16,32").split(","))
        out = [dict(BLOCK_N=bn, BLOCK_M=16, BLOCK_K=min(bk, block_size), SWAP=m % 2 == 1, num_warps=4,
                    num_stages=1)]
    return out


_gemm_candidates_cached = functools.cache(_gemm_candidate_list)  # M only matters as <= 16, <= 64 or more


def _launch(x, qweight, scales, zeros, bias, encoding, block_size, in_features, silu, norm_weight=None, eps=0.0,
            residual=None, layout="rows"):
    """y = dequant(W) @ xn + bias (+ residual), xn = rmsnorm(x) * norm_weight when norm_weight is given, else x;
    with silu: silu(gate) * up of the two row halves. The M = 1 word GEMV does the norm and the residual add
    inside the kernel; other paths run the RMSNorm kernel first and add the residual after.
    layout: "rows" (canonical), "il4" (int4 rows interleaved by 4) or "tc16" (int4 in 16-row tiles for the
    tensor-core GEMV), layout.py."""
    _check(x, qweight, scales, zeros, encoding, block_size, in_features)
    il = layout == "il4"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}")
    if il and (encoding not in ("int4_sym", "int4_asym") or scales.shape[0] % (8 if silu else 4) or block_size % 32):
        raise ValueError(f"layout il4 needs int4 weights with rows in groups of 4 (got {encoding}, "
                         f"{scales.shape[0]} rows)")
    if layout == "tc16" and not can_tc16(encoding, qweight, block_size, 32 if silu else 16):
        raise ValueError(f"layout tc16 needs int4 weights in tiles of 16 rows and blocks of 64 k or more (got "
                         f"{encoding}, {scales.shape[0]} rows, block {block_size})")
    if norm_weight is not None and norm_weight.shape != (in_features,):
        raise ValueError(f"norm weight of shape {tuple(norm_weight.shape)} for {in_features} input features")
    k = in_features
    n, nb = scales.shape
    if silu and n % 2:
        raise ValueError("gate+up weight needs an even number of rows")
    n_out = n // 2 if silu else n
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n_out)
    if residual is not None and residual.shape != (*lead, n_out):
        raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {(*lead, n_out)}")
    code = _code_table(x.device) if encoding == "nf4" else scales
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    dev = x.device.index if x.device.type == "cuda" else -1
    common = (encoding, block_size, x.dtype, scales.dtype, n, k, bias is not None, silu, norm_weight is not None,
              residual is not None, layout)

    if m == 1 and layout == "tc16" and x.dtype in (torch.bfloat16, torch.float16) and k % 2 == 0:
        # the tensor-core GEMV: bias and residual inside, the RMSNorm kernel before it
        if norm_weight is not None:
            from .rmsnorm import rms_norm_launch
            x2 = rms_norm_launch(x2, norm_weight, eps)
        try:
            x32 = x2.view(torch.int32)  # (1, K/2) bf16/fp16 pairs
        except RuntimeError:  # an odd element offset
            x32 = x2.clone().view(torch.int32)
        res = residual.reshape(n_out).contiguous() if residual is not None else scales
        flags = dict(ENC=encoding, B=block_size, HAS_BIAS=bias is not None, SILU=silu, HAS_RES=residual is not None,
                     F16=x.dtype == torch.float16, INTERPRET=INTERPRET)
        kw = _gemv_pdl(x2, k)
        nq = nb * block_size // 64
        flags["KFULL"] = k == nq * 64

        def launch(c, w, s, zz, out=y):
            split = c.get("SPLIT", 1)
            if split > 1:  # partials of each tile's K shares; the counters stay zero between launches
                part = torch.empty(n_out // 16 * split * 32, dtype=torch.float32, device=x.device)
                cnt = _tile_counters(x.device, n_out // 16)
            else:
                part = cnt = scales
            LAST["gemv"] = gemv_tc16_kernel[(n_out // 16, split)](x32, w, s, zz, b, res, out, part, cnt, n_out, k,
                                                                  nb, nq, **flags, **kw, **c)
        words = qweight.view(torch.int32)  # to_tc16 made it contiguous
        cfg = LAST["gemv_cfg"] = _pick_chain((dev, "gemv_tc16") + common, _tc16_candidates(), launch,
                                             (words, scales, z))
        launch(cfg, words, scales, z)
        return y.reshape(*lead, n_out)

    if silu and layout == "tc16" and not TC16_SILU_GEMM:
        # M > 1: the gate and up halves as two plain GEMMs (each half is whole 16-row tiles, so a tc16 part of
        # its own), silu(gate) * up in torch. The fused SILU GEMM on tc16 gave wrong rows now and then on the
        # H100 at K = 3584, N = 2 x 18944, M = 64 (rel. err 6e-3 and 1e7 in two runs; il4 and the unfused halves
        # were right in the same runs; docs/PERF.md round 6). The loader never gives gate+up tc16, so this is
        # the API's path only.
        if norm_weight is not None:
            from .rmsnorm import rms_norm_launch
            x2 = rms_norm_launch(x2, norm_weight, eps)
        zg, zu = (None, None) if zeros is None else (zeros[:n_out], zeros[n_out:])
        g = _launch(x2, qweight[:n_out], scales[:n_out], zg, None, encoding, block_size, k, False, layout=layout)
        u = _launch(x2, qweight[n_out:], scales[n_out:], zu, None, encoding, block_size, k, False, layout=layout)
        return (torch.nn.functional.silu(g.float()) * u.float()).to(x.dtype).reshape(*lead, n_out)

    w32 = None
    if m == 1 and il:
        w32 = qweight.view(torch.int32)  # interleave4 made it contiguous
    elif m == 1 and layout == "rows" and encoding in ("int4_sym", "int4_asym"):
        try:  # the packed bytes as int32 words (no copy: Kp/2 is a multiple of 16 bytes for B >= 32)
            w32 = qweight.view(torch.int32)
        except RuntimeError:  # a view at an odd byte offset: the byte-wise GEMV below
            pass
    big = n * k > FUSE_MAX_WEIGHTS
    if (norm_weight is not None or residual is not None) and (w32 is None or not FUSE or big):
        # not fused into the word GEMV: the RMSNorm kernel first, the residual added after
        if norm_weight is not None:
            from .rmsnorm import rms_norm_launch
            x2 = rms_norm_launch(x2, norm_weight, eps)
        y = _launch(x2, qweight, scales, zeros, bias, encoding, block_size, in_features, silu, layout=layout)
        if residual is not None:
            y = residual.reshape(m, n_out) + y  # the residual stream's own rounding
        return y.reshape(*lead, n_out)
    if w32 is not None:
        pdl = pdl_kwargs(x2, gemv=True)
        nw = norm_weight if norm_weight is not None else scales
        res = residual.reshape(n_out).contiguous() if residual is not None else scales
        flags = dict(ENC=encoding, B=block_size, HAS_BIAS=bias is not None, SILU=silu,
                     NORM=norm_weight is not None, HAS_RES=residual is not None, INTERPRET=INTERPRET)
        if il:
            # Long K without PDL. Measured on the H100 (kernels.py, PERF.md round 4): 7B down (K = 18944, 896
            # programs) took 31 us launched with PDL after another GEMV and 23 us without, whatever the config
            # or where the kernel let its successor in; 0.5B down (K = 4864) was faster with PDL (5.0 against
            # 6.1 us). Our reading: the successor's programs become resident early and unevenly across the
            # SMs, and a grid of one long wave is as slow as its most loaded SM. The tuner cannot see it (it
            # times each config in a chain of itself), hence a rule. Not launching with PDL is always safe.
            kw = _gemv_pdl(x2, k)
            # The tensor-core GEMV is launched with PDL at any K: 7B decode 486.2 -> 496.3 tok/s with down (K =
            # 18944) under PDL (H100, round 16, attempt 79: ab_env.sh with QRUN_PDL_MAX_K=1000000, two processes a
            # side, its pick for down in both).
            kw_mma = pdl_kwargs(x2, gemv=True)

            def launch(c, w, s, zz, out=y):
                if c.get("MMA"):  # the tensor-core GEMV: 32 rows (8 row groups) a program
                    progs, split = triton_cdiv(n_out // 4, 8), c["SPLIT"]
                    if split > 1:  # partials of each row set's K shares; the counters stay zero between launches
                        part = torch.empty(progs * split * 65, dtype=torch.float32, device=x.device)
                        cnt = _tile_counters(x.device, progs)
                    else:
                        part = cnt = scales
                    LAST["gemv"] = gemv_il4_mma_kernel[(progs, split)](
                        x2, w, s, zz, b, nw, res, out, part, cnt, n_out, k, nb, eps, ENC=encoding,
                        HAS_BIAS=bias is not None, SILU=silu, NORM=norm_weight is not None,
                        HAS_RES=residual is not None, F16=x.dtype == torch.float16, NBS=triton_cdiv(nb, split),
                        SPLIT=split, AHEAD=c["AHEAD"], KNOCK=MMA_KNOCK, num_warps=c["num_warps"], **kw_mma)
                    return
                progs = triton_cdiv(n_out // 4, c["R4"])
                part, cnt = _il4_scratch(progs, c, x.device, scales)  # the counters stay zero between launches
                LAST["gemv"] = gemv_il4_kernel[(progs, c.get("SPLIT", 1))](x2, w, s, zz, b, nw, res, out, part, cnt, n_out, k,
                                                               nb, _il4_blocks_per_split(nb, c), eps, **flags, **kw,
                                                               **c)
            kind, cands = "gemv_il4", _il4_candidates(nb, mma=_mma_ok(dev, encoding, block_size, x.dtype))
        else:
            def launch(c, w, s, zz, out=y):
                c = dict(c)
                per_sm = c.pop("PER_SM", 0)  # > 0: a persistent grid of per_sm programs per SM
                grid = triton_cdiv(n_out, c["BLOCK_N"])
                if per_sm:
                    grid = min(grid, per_sm * _sm_count(x2.device))
                LAST["gemv"] = gemv_int4_kernel[(grid,)](x2, w, s, zz, b, nw, res, out, n_out, k, nb,
                                                         w.stride(0), s.stride(0), zz.stride(0), eps,
                                                         PERSIST=per_sm > 0, **flags, **pdl, **c)
            kind, cands = "gemv4", _gemv4_candidates(block_size, nb)
        cfg = LAST["gemv_cfg"] = _pick_chain((dev, kind) + common, cands, launch, (w32, scales, z))
        launch(cfg, w32, scales, z)
        return y.reshape(*lead, n_out)

    if m == 1 and layout == "rows":
        def launch(c, out=y):
            grid = (triton_cdiv(n_out, c["BLOCK_N"]),)
            LAST["gemv"] = gemv_kernel[grid](x2, qweight, scales, z, code, b, out, n_out, k, nb, qweight.stride(0),
                              scales.stride(0), z.stride(0), ENC=encoding, B=block_size,
                              HAS_BIAS=bias is not None, SILU=silu, INTERPRET=INTERPRET, **pdl_kwargs(x2, gemv=True),
                              **c)
        cfg = LAST["gemv_cfg"] = _pick((dev, "gemv") + common, _gemv_candidates(encoding, block_size, nb), launch)
        launch(cfg)
        return y.reshape(*lead, n_out)

    mb = triton_next_pow2(m)
    kp = nb * block_size
    wg = _wg_applies(x2, qweight, encoding, block_size, k, kp, n_out, layout)
    cands = [c for c in _gemm_candidates(m, block_size, layout) if not c.get("WG") or (wg and wg_config_ok(c, silu))]

    def split_of(c):
        # Split K only when the tile grid cannot fill the GPU and each split keeps >= 4 K tiles.
        # M <= 64 only: at M = 300 (3 M tiles, K = 18944) the atomic split gave non-finite outputs on the
        # H100 (triton 3.6), cause not found; large M fills the GPU with M tiles anyway.
        if silu or INTERPRET or m > 64:
            return 1
        tiles = triton_cdiv(n_out, c["BLOCK_N"]) * triton_cdiv(m, c["BLOCK_M"])
        sms = _sm_count(x.device)
        if tiles >= sms:
            return 1
        return max(1, min(triton_cdiv(2 * sms, tiles), kp // c["BLOCK_K"] // 4, 16))

    def even(c):  # whole tiles along M, N and K (kp is whole K tiles already): the kernel drops every load mask
        return GEMM_EVEN and m % c["BLOCK_M"] == 0 and n_out % c["BLOCK_N"] == 0 and k == kp

    def launch(c, out=None):
        if c.get("WG"):
            out = y if out is None else out
            xd, wd = wg_descriptors(x2, qweight, c["BLOCK_N"], c["BLOCK_M"], silu)
            nr = c["BLOCK_N"] // 2 if silu else c["BLOCK_N"]  # output rows a program (SILU: gate and up rows)
            grid = (triton_cdiv(n_out, nr), triton_cdiv(m, c["BLOCK_M"]))
            args = (xd, wd, scales, z, b, out, m, n_out, scales.stride(0), z.stride(0), out.stride(0))
            common_c = dict(B=block_size, ASYM=encoding == "int4_asym", HAS_BIAS=bias is not None, SILU=silu,
                            BLOCK_N=c["BLOCK_N"], BLOCK_M=c["BLOCK_M"], STAGES=c["num_stages"],
                            EVEN=m % c["BLOCK_M"] == 0 and n_out % nr == 0, num_warps=c["num_warps"])
            if c.get("WS"):
                tiles, nk = grid[0] * grid[1], k // 64
                # SK: whole waves one program a tile, then the tiles left over split `ways` ways; else every
                # tile one program (one launch; a one-element dummy workspace: no tile is split)
                sms = _sm_count(x.device)
                rest = tiles % sms if c["SK"] else 0
                ways = max(1, min(sms // rest, nk // 4, c["SK_WAYS"])) if rest else 1
                ws_kw = dict(QSTAGES=c["QSTAGES"], WSTAGES=c["WSTAGES"], DQ_WARPS=c["DQ_WARPS"],
                             DQ_REGS=c["maxnreg"], maxnreg=c["maxnreg"], **common_c)
                whole = tiles - rest if ways > 1 else tiles
                if whole:
                    part, cnt = _sk_workspace(x.device, 1, 1)
                    LAST["gemm"] = gemm_il4_ws_kernel[(whole,)](*args[:6], part, cnt, *args[6:], whole * nk,
                                                               grid[1], 0, **ws_kw)
                if whole < tiles:
                    progs = rest * ways
                    part, cnt = _sk_workspace(x.device, progs, c["BLOCK_N"] * c["BLOCK_M"])
                    LAST["gemm"] = gemm_il4_ws_kernel[(progs,)](*args[:6], part, cnt, *args[6:], rest * nk,
                                                               grid[1], whole, **ws_kw)
            else:
                LAST["gemm"] = gemm_il4_wg_kernel[grid](*args, **common_c)
            return out
        split = split_of(c)
        if out is None:
            out = torch.zeros((m, n_out), dtype=torch.float32, device=x.device) if split > 1 else y
        grid = (triton_cdiv(n_out, c["BLOCK_N"]), triton_cdiv(m, c["BLOCK_M"]), split)
        LAST["gemm"] = gemm_kernel[grid](x2, qweight, scales, z, code, b, out, m, n_out, k, kp, x2.stride(0),
                          qweight.stride(0), scales.stride(0), z.stride(0), out.stride(0),
                          ENC=encoding, B=block_size, HAS_BIAS=bias is not None, SILU=silu, SPLIT_K=split,
                          LAY=LAYOUTS.index(layout), INTERPRET=INTERPRET, EVEN=even(c), **c)
        return out

    cfg = LAST["gemm_cfg"] = _pick((dev, "gemm", mb) + common, cands, launch)
    LAST["gemm_split"] = split_of(cfg)
    LAST["gemm_even"] = even(cfg)
    out = launch(cfg)
    if out is not y:
        y.copy_(out)
    return y.reshape(*lead, n_out)


def wg_config_ok(c: dict, silu: bool) -> bool:
    """A Gluon GEMM config that can run this projection: gate+up's SILU epilogue needs x buffers that hold the
    float32 accumulator (num_stages x 32 >= BLOCK_N; gemm_wg.py asserts it)."""
    return not (silu and c["num_stages"] * 32 < c["BLOCK_N"])


def _wg_applies(x2, qweight, encoding, block_size, k, kp, n_out, layout) -> bool:
    """Whether the Gluon GEMM (gemm_wg.py) can run this call: il4 int4, bf16/fp16 x, whole 64-k tiles with one
    scale each (K = Kp, multiple of 64, blocks of 64 k or more), rows in il4 groups, bases and strides TMA can
    address, on a Hopper GPU with a triton that has Gluon."""
    if not (GEMM_WG and layout == "il4" and encoding in ("int4_sym", "int4_asym") and x2.is_cuda
            and x2.dtype in (torch.bfloat16, torch.float16) and k == kp and k % 64 == 0 and block_size % 64 == 0
            and n_out % 4 == 0 and gemm_il4_wg_kernel is not None):
        return False
    if x2.data_ptr() % 16 or (x2.stride(0) * x2.element_size()) % 16 or qweight.data_ptr() % 16 \
            or not qweight.is_contiguous():
        return False
    return _capability(x2.device.index if x2.device.index is not None else torch.cuda.current_device())[0] == 9


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quant_linear_triton(x, qweight, scales, zeros, bias, encoding, block_size, in_features, norm_weight=None,
                        eps=0.0, residual=None, layout="rows"):
    return _launch(x, qweight, scales, zeros, bias, encoding, block_size, in_features, False, norm_weight, eps,
                   residual, layout)


def quant_linear_silu_mul_triton(x, qweight, scales, zeros, encoding, block_size, in_features, norm_weight=None,
                                 eps=0.0, layout="rows"):
    return _launch(x, qweight, scales, zeros, None, encoding, block_size, in_features, True, norm_weight, eps,
                   layout=layout)


def quant_linear_rope_kv_triton(x, qweight, scales, zeros, bias, encoding, block_size, in_features, norm_weight,
                                eps, cos, sin, input_pos, k_cache, v_cache, n_heads):
    """The decode step's qkv projection with RoPE and the cache write in its epilogue (QRUN_ROPE_QKV, gemv_il.py
    ROPE): x (1, 1, K) -> q (1, H, hd) rotated; k rotated and v written into k_cache / v_cache (B', KV, S, hd)
    at input_pos (1,). The weight is the il4 one of rows q | k | v, (H + 2 KV) hd of them."""
    _check(x, qweight, scales, zeros, encoding, block_size, in_features)
    _, kv, s_len, hd = k_cache.shape
    n, nb = scales.shape
    if encoding not in ("int4_sym", "int4_asym") or hd % 8 or n != (n_heads + 2 * kv) * hd or x.numel() != in_features:
        raise ValueError(f"qkv with RoPE needs int4 il4 weights of (heads + 2 kv heads) x head dim rows and one "
                         f"token (got {encoding}, {n} rows, {n_heads} + 2 x {kv} heads of {hd}, x {tuple(x.shape)})")
    k = in_features
    x2 = x.reshape(1, k).contiguous()
    q = torch.empty(1, n_heads, hd, dtype=x.dtype, device=x.device)
    z = zeros if zeros is not None else scales
    b = bias if bias is not None else scales
    nw = norm_weight if norm_weight is not None else scales
    flags = dict(ENC=encoding, B=block_size, HAS_BIAS=bias is not None, SILU=False, NORM=norm_weight is not None,
                 HAS_RES=False, INTERPRET=INTERPRET, ROPE=hd)
    kw = _gemv_pdl(x2, k)
    progs = n // 8  # R4 = 2 row groups of 4 rows a program

    def launch(c, w, sc, zz):
        part, cnt = _il4_scratch(progs, c, x.device, sc)
        LAST["gemv"] = gemv_il4_kernel[(progs, c.get("SPLIT", 1))](x2, w, sc, zz, b, nw, sc, q, part, cnt, n, k, nb,
                                                       _il4_blocks_per_split(nb, c), eps, **flags, **kw,
                                                       cos_ptr=cos, sin_ptr=sin, pos_ptr=input_pos, kc_ptr=k_cache,
                                                       vc_ptr=v_cache, NH=n_heads, NKV=kv, S=s_len, **c)
    dev = x.device.index if x.device.type == "cuda" else -1
    key = (dev, "gemv_il4_rope", encoding, block_size, x.dtype, scales.dtype, n, k, bias is not None, False,
           norm_weight is not None, False, "il4")
    w32 = qweight.view(torch.int32)
    cfg = LAST["gemv_cfg"] = _pick_chain(key, _il4_candidates(nb, IL4_ROPE_TABLE), launch, (w32, scales, z))
    launch(cfg, w32, scales, z)
    return q


# ------------------------------------------------------------------------------------ torch.library ops

@torch.library.custom_op("qrun::quant_linear", mutates_args=())
def quant_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, bias: torch.Tensor | None, encoding: str, block_size: int,
                    in_features: int, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                    residual: torch.Tensor | None = None, layout: str = "rows") -> torch.Tensor:
    return quant_linear_triton(x, qweight, scales, zeros, bias, encoding, block_size, in_features, norm_weight,
                               eps, residual, layout)


@quant_linear_op.register_fake
def _(x, qweight, scales, zeros, bias, encoding, block_size, in_features, norm_weight=None, eps=0.0,
      residual=None, layout="rows"):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


@torch.library.custom_op("qrun::quant_linear_silu_mul", mutates_args=())
def quant_linear_silu_mul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             zeros: torch.Tensor | None, encoding: str, block_size: int,
                             in_features: int, norm_weight: torch.Tensor | None = None,
                             eps: float = 0.0, layout: str = "rows") -> torch.Tensor:
    return quant_linear_silu_mul_triton(x, qweight, scales, zeros, encoding, block_size, in_features,
                                        norm_weight, eps, layout)


@quant_linear_silu_mul_op.register_fake
def _(x, qweight, scales, zeros, encoding, block_size, in_features, norm_weight=None, eps=0.0, layout="rows"):
    return x.new_empty((*x.shape[:-1], scales.shape[0] // 2))


@torch.library.custom_op("qrun::quant_linear_rope_kv", mutates_args=("k_cache", "v_cache"))
def quant_linear_rope_kv_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor | None, bias: torch.Tensor | None, encoding: str, block_size: int,
                            in_features: int, norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                            sin: torch.Tensor, input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            n_heads: int) -> torch.Tensor:
    return quant_linear_rope_kv_triton(x, qweight, scales, zeros, bias, encoding, block_size, in_features,
                                       norm_weight, eps, cos, sin, input_pos, k_cache, v_cache, n_heads)


@quant_linear_rope_kv_op.register_fake
def _(x, qweight, scales, zeros, bias, encoding, block_size, in_features, norm_weight, eps, cos, sin, input_pos,
      k_cache, v_cache, n_heads):
    return x.new_empty(1, n_heads, k_cache.shape[-1])
