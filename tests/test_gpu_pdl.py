"""GPU (pytest -m gpu, run on the device): programmatic dependent launch must not change a single bit.

With PDL each decode kernel starts before the previous one has finished and loads its weights early; if any
kernel read an activation or wrote a buffer before its gdc_wait, graph replays would race and the logits
would differ from the serialised launches (or vary between runs)."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def model_file(tiny_qwen2_dir, tmp_path_factory):
    from qrun.runtime.convert import ConvertOptions, convert
    out = str(tmp_path_factory.mktemp("m") / "m.stcmp")
    convert(tiny_qwen2_dir, out, ConvertOptions(bits=4), progress=False)
    return out


def _decode(model_file, pdl_on: bool, monkeypatch, early: str = "0", long_k: bool = False) -> torch.Tensor:
    import qrun
    from qrun.kernels import ops, pdl
    from qrun.runtime.generate import prefill
    monkeypatch.setenv("QRUN_PDL", "1" if pdl_on else "0")
    pdl.pdl_enabled.cache_clear()
    monkeypatch.setattr(pdl, "EARLY", early)
    if long_k:  # every GEMV of the tiny model takes the long-K rule's path: launched without PDL, mode 3
        monkeypatch.setattr(ops, "PDL_MAX_K", 64)
    try:
        llm = qrun.load(model_file, device="cuda", progress=False, max_seq_len=96, graph=True)
        torch.manual_seed(0)
        prompt = torch.randint(0, llm.model.args.vocab_size, (1, 11), device="cuda")
        logits = prefill(llm.model, prompt, torch.arange(11, device="cuda"))
        tok, pos, seq = logits.argmax(-1), torch.tensor([11], device="cuda"), []
        for _ in range(40):
            logits = llm.decode_step(tok.view(1, 1), pos).clone()
            seq.append(logits)
            tok = logits.argmax(-1)
            pos += 1
        return torch.stack(seq)
    finally:
        monkeypatch.delenv("QRUN_PDL")
        pdl.pdl_enabled.cache_clear()


def test_pdl_decode_is_bitwise_identical(model_file, monkeypatch):
    from qrun.kernels import pdl
    if not pdl.pdl_enabled(torch.cuda.current_device()):
        pytest.skip("no programmatic dependent launch on this GPU / triton")
    off = _decode(model_file, False, monkeypatch)
    on = _decode(model_file, True, monkeypatch)
    again = _decode(model_file, True, monkeypatch)
    assert torch.isfinite(on).all()
    torch.testing.assert_close(on, off, rtol=0, atol=0)
    torch.testing.assert_close(again, on, rtol=0, atol=0)


@pytest.mark.parametrize("early,long_k", [("1", False), ("1", True), ("small", False)])
def test_pdl_early_trigger_is_bitwise_identical(model_file, monkeypatch, early, long_k):
    """QRUN_PDL_EARLY (pdl.py): kernels let the next one in before their own wait, so several kernels are
    resident at once; with long_k every GEMV is launched without PDL but still lets its successor in (mode 3).
    "small": only the kernels that are not GEMVs do."""
    from qrun.kernels import pdl
    if not pdl.pdl_enabled(torch.cuda.current_device()):
        pytest.skip("no programmatic dependent launch on this GPU / triton")
    off = _decode(model_file, False, monkeypatch)
    got = _decode(model_file, True, monkeypatch, early=early, long_k=long_k)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, off, rtol=0, atol=0)
