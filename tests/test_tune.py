"""qrun tune's search (qrun/runtime/tune.py) on the CPU: the coordinate descent with a made-up cost, and the
command's refusal without a GPU. The GPU run is test_gpu_model.py::test_tune_decode_keeps_candidates_and_results."""
import pytest


def _descend(cost, cands, current, noise=0.003, passes=1):
    from qrun.runtime.tune import descend
    applied = dict(current)
    calls = []

    def measure():
        calls.append(dict(applied))
        return cost(applied)

    out = descend(list(cands), lambda k: cands[k], current, measure, applied.__setitem__, passes=passes,
                  noise=noise)
    return out, applied, calls


def test_descend_finds_each_coordinates_best_and_applies_it():
    # step time = a's cost + b's cost, where b = 20 is cheap only together with a = 2: b's best depends on
    # whether a has moved to its own best yet
    cands = {"a": [1, 2, 3], "b": [10, 20]}

    def cost(s):
        return {1: 5.0, 2: 3.0, 3: 4.0}[s["a"]] + (1.0 if s["b"] == 10 else 0.5 if s["a"] == 2 else 2.0)
    out, applied, calls = _descend(cost, cands, {"a": 1, "b": 10})
    assert applied == {"a": 2, "b": 20}
    assert [r.after for r in out] == [2, 20] and [r.before for r in out] == [1, 10]
    assert len(calls) == 5  # every candidate of each key once
    assert calls[3:] == [{"a": 2, "b": 10}, {"a": 2, "b": 20}]  # b is searched with a at its new pick
    assert out[0].times_ms[0] == (cost({"a": 2, "b": 10}), 2)  # fastest first


def test_descend_keeps_the_current_pick_within_the_noise():
    cands = {"a": [1, 2]}
    out, applied, _ = _descend(lambda s: {1: 1.000, 2: 0.999}[s["a"]], cands, {"a": 1}, noise=0.003)
    assert applied == {"a": 1} and out[0].after == 1
    out, applied, _ = _descend(lambda s: {1: 1.0, 2: 0.9}[s["a"]], cands, {"a": 1}, noise=0.003)
    assert applied == {"a": 2}


def test_descend_skips_a_candidate_that_fails():
    cands = {"a": [1, 2, 3]}

    def cost(s):
        if s["a"] == 3:
            raise RuntimeError("does not compile")
        return float(s["a"])
    out, applied, _ = _descend(cost, cands, {"a": 2})
    assert applied == {"a": 1}
    assert [c for _, c in out[0].times_ms] == [1, 2]


def test_set_config_refuses_a_config_the_launcher_does_not_offer():
    import torch

    from qrun.kernels import ops
    key = (0, "gemv_il4", "int4_sym", 128, torch.bfloat16, torch.float16, 1152, 896, False, False, True, False,
           "il4")
    cands = ops.gemv_candidates(key)
    assert cands
    try:
        ops.set_config(key, cands[-1])
        assert ops.get_config(key) == cands[-1] and key in ops.gemv_keys()
        with pytest.raises(ValueError):
            ops.set_config(key, dict(cands[-1], G=3))
    finally:
        ops._tuned.pop(key, None)


def test_tune_command_needs_a_gpu(capsys):
    from qrun.cli.main import main
    assert main(["tune", "--model", "nothing.stcmp", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("qrun: error:") and "CUDA" in err and "\n" not in err
