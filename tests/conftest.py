import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The tuner's picks stay out of the user's cache, and the GPU tests time candidates instead of reading old
# picks (tests/test_tune_cache.py turns it back on in a temporary directory).
os.environ["QRUN_TUNE_CACHE"] = "0"


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    from tiny_models import make_hf_dir
    return make_hf_dir(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture
def run_cli(capsys):
    """Run `qrun ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from qrun.cli.main import main

    def run(*args):
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run
