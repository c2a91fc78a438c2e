"""Run a test module's kernel cases under the Triton CPU interpreter, in a subprocess: TRITON_INTERPRET must
be set before triton is imported, and the other test modules import it normally."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(module_file: str) -> dict:
    """Run `module_file` as a script with TRITON_INTERPRET=1; it prints its results as JSON on its last line."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, module_file], capture_output=True, text=True, env=env, timeout=600,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
