"""The kernel tuner's picks on disk, one JSON file per GPU model, triton version and kernel source.

Why: the tuner times every candidate config of each shape the first time a process meets it (ops._pick_chain),
which costs seconds of warm-up per process, and a pick made from noisy timings differs between processes, so
decode speed did too (PERF.md rounds 4 and 7). With the picks on disk, later processes skip the timing and run
the same configs. Any change to a file in qrun/kernels/ (candidates, kernels) starts a new file, and a stored
pick is used only while it is still among the candidates the launcher offers.

    $QRUN_CACHE (or the user cache dir)/tune-<gpu>-triton<version>-<source hash>.json
    {"('gemv_il4', ...key without the device index)": {"R4": 1, "G": 4, ...}, ...}

QRUN_TUNE_CACHE=0 turns it off (the GPU tests do, to exercise the tuner itself). A file that cannot be read or
parsed counts as empty; one that cannot be written leaves the picks in memory only.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile

_files: dict[str, dict] = {}  # path -> its picks, read once per process
_source: list[str] = []


def enabled() -> bool:
    return os.environ.get("QRUN_TUNE_CACHE", "1") != "0"


def _source_hash() -> str:
    """Of the kernel sources and the QRUN_ settings that change what the launchers run or offer (PDL, fusion,
    layouts...): picks timed under one do not carry over to another."""
    if not _source:
        h = hashlib.sha1()
        for f in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py"))):
            with open(f, "rb") as fh:
                h.update(fh.read())
        _source.append(h.hexdigest()[:12])
    env = sorted((k, v) for k, v in os.environ.items()
                 if k.startswith("QRUN_") and k not in ("QRUN_CACHE", "QRUN_DEBUG", "QRUN_TUNE_CACHE"))
    return _source[0] + ("-" + hashlib.sha1(repr(env).encode()).hexdigest()[:8] if env else "")


def path(device_name: str) -> str:
    import triton

    from qrun.paths import cache_dir
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device_name).strip("-") or "gpu"
    return os.path.join(cache_dir(), f"tune-{slug}-triton{triton.__version__}-{_source_hash()}.json")


def _load(p: str) -> dict:
    """The picks in file p as it is on disk now; {} if it is missing or unreadable."""
    try:
        with open(p) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _read(p: str) -> dict:
    if p not in _files:
        _files[p] = _load(p)
    return _files[p]


def get(device_name: str, key: str, candidates: list[dict]) -> dict | None:
    """The stored pick for key if it is one of `candidates`, else None."""
    if not enabled():
        return None
    cfg = _read(path(device_name)).get(key)
    return cfg if isinstance(cfg, dict) and cfg in candidates else None


def put(device_name: str, key: str, cfg: dict) -> None:
    """Store a pick: merged into the file as it is on disk now, written to a temporary file and renamed over
    it, so a reader never sees half a file and another process's picks are kept."""
    if not enabled():
        return
    p = path(device_name)
    picks = _read(p)
    picks[key] = cfg
    picks.update({k: v for k, v in _load(p).items() if k not in picks})  # other processes' picks since
    tmp = None
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=".tune-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(picks, f, indent=0, sort_keys=True)
        os.replace(tmp, p)
    except OSError:  # a read-only or full cache dir: the picks stay in this process's memory
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
