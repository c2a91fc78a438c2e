"""Where qrun keeps files between runs (the demo model, the kernel tuner's picks)."""
from __future__ import annotations

import os


def cache_dir() -> str:
    """$QRUN_CACHE if set, else platformdirs.user_cache_dir("qrun") (which honours XDG_CACHE_HOME)."""
    d = os.environ.get("QRUN_CACHE")
    if not d:
        import platformdirs
        d = platformdirs.user_cache_dir("qrun")
    return d
