"""The CUDA kernels compile for sm_90 ahead of time, on a machine without a GPU (triton's bundled ptxas):
the decode attention kernels at head_dim 16, 64 and 128 and every tensor-core GEMV config. The interpreter
runs the kernels' arithmetic but not the compiler's checks (round 6: a tl.dot of depth 8). The full set of
variants, against the device's triton, is benchmarks/compile_check.py."""
import os
import shutil
import sys

import pytest

triton = pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        return False
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(path) or shutil.which("ptxas") is not None


pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or not _has_ptxas(),
                                reason="needs triton's nvidia backend with ptxas, and not the interpreter")


@pytest.mark.parametrize("family", ["attention", "tc16", "il4_rope"])
def test_kernels_compile_for_sm90(family):
    import compile_check
    failed = []
    for kernel, types, const, nw, ns in compile_check.FAMILIES[family]():
        try:
            k = compile_check.compile_one(kernel, types, const, nw, ns)
        except Exception as e:  # noqa: BLE001
            failed.append(f"{kernel.fn.__name__} {const}: {str(e).strip().splitlines()[-1:]}")
            continue
        assert k.asm["cubin"], kernel.fn.__name__
    assert not failed, "\n".join(failed)
