"""The tuner's picks on disk (qrun/kernels/tune_cache.py) and how ops uses them; no GPU needed."""
import json
import os

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from qrun.kernels import tune_cache
    monkeypatch.setenv("QRUN_CACHE", str(tmp_path))
    monkeypatch.setenv("QRUN_TUNE_CACHE", "1")
    monkeypatch.setattr(tune_cache, "_files", {})
    return tune_cache


A, B = {"R4": 1, "G": 4, "DEEP": False}, {"R4": 2, "G": 2, "DEEP": True}


def test_a_pick_comes_back_in_a_new_process(cache, tmp_path):
    cache.put("NVIDIA H100 80GB HBM3", "('gemv_il4', 3584)", B)
    cache._files.clear()  # what a new process sees: only the file
    assert cache.get("NVIDIA H100 80GB HBM3", "('gemv_il4', 3584)", [A, B]) == B
    assert cache.get("NVIDIA H100 80GB HBM3", "('gemv_il4', 896)", [A, B]) is None
    assert cache.get("NVIDIA H200", "('gemv_il4', 3584)", [A, B]) is None  # one file per GPU model
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("tune-NVIDIA-H100-80GB-HBM3-triton"), files


def test_a_pick_no_longer_offered_is_not_used(cache):
    # e.g. a config since left out as wrong (ops.TC16_BAD_GEMM): the launcher times the candidates again
    cache.put("gpu", "k", B)
    cache._files.clear()
    assert cache.get("gpu", "k", [A]) is None


def test_other_processes_picks_are_kept_and_bad_files_ignored(cache):
    p = cache.path("gpu")
    cache.put("gpu", "mine", A)
    with open(p) as f:
        d = json.load(f)
    d["theirs"] = B  # written by another process after this one read the file
    with open(p, "w") as f:
        json.dump(d, f)
    cache.put("gpu", "mine2", B)
    with open(p) as f:
        assert json.load(f) == {"mine": A, "theirs": B, "mine2": B}
    with open(p, "w") as f:
        f.write('{"trunc')  # a corrupt file reads as empty and is replaced whole
    cache._files.clear()
    assert cache.get("gpu", "mine", [A, B]) is None
    cache.put("gpu", "k", A)
    with open(p) as f:
        assert json.load(f) == {"k": A}
    assert [n for n in os.listdir(os.path.dirname(p)) if n.endswith(".tmp")] == []


def test_settings_that_change_the_kernels_get_their_own_file(cache, monkeypatch):
    base = cache.path("gpu")
    monkeypatch.setenv("QRUN_PDL", "0")
    assert cache.path("gpu") != base
    monkeypatch.setenv("QRUN_TUNE_CACHE", "0")  # off: nothing read, nothing written
    cache.put("gpu", "k", A)
    assert cache.get("gpu", "k", [A]) is None and not os.path.exists(cache.path("gpu"))


def test_unwritable_cache_dir_keeps_the_pick_in_memory(cache, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("QRUN_CACHE", str(blocker / "sub"))  # a directory under a file cannot be made
    cache.put("gpu", "k", A)
    assert cache.get("gpu", "k", [A, B]) == A


def test_ops_uses_a_stored_pick_instead_of_timing(cache, monkeypatch):
    import torch

    from qrun.kernels import ops
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU torch has no CUDA
    monkeypatch.setattr(ops, "_device_name", lambda index: "gpu")
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "TUNE", True)
    monkeypatch.setattr(ops, "_tuned", {})
    key = (0, "gemv_il4", "int4_sym", 128)
    assert ops._untimed(key, [A, B]) is None  # nothing stored: the launcher would time A and B
    ops._remember(key, B)
    ops._tuned.clear()
    cache._files.clear()
    assert ops._untimed(key, [A, B]) == B and ops._tuned[key] == B
    assert ops._untimed((1, "gemv_il4", "int4_sym", 128), [A, B]) == B  # the device index is not in the file's key
