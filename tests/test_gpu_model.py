"""GPU end to end (run on the device: pytest -m gpu): the CUDA path (Triton kernels, pinned streaming load,
CUDA-graph decode) computes what the CPU reference computes."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module", params=[dict(bits=4), dict(bits=8), dict(bits=4, scheme="asym")],
                ids=["int4", "int8", "asym"])
def model_file(request, tiny_qwen2_dir, tmp_path_factory):
    from qrun.runtime.convert import ConvertOptions, convert
    out = str(tmp_path_factory.mktemp("m") / "m.stcmp")
    convert(tiny_qwen2_dir, out, ConvertOptions(**request.param), progress=False)
    return out


def test_cuda_logits_match_cpu(model_file):
    import qrun
    cpu = qrun.load(model_file, device="cpu", dtype="float32", progress=False)
    gpu = qrun.load(model_file, device="cuda", dtype="float32", progress=False)
    ids = torch.randint(0, cpu.model.args.vocab_size, (1, 20))
    with torch.inference_mode():
        a = cpu.model(ids)
        b = gpu.model(ids.cuda()).cpu()
    assert torch.isfinite(b).all()
    # The GPU GEMM runs tl.dot in tf32 for float32 activations (~1e-3 relative per matmul)
    err = ((a - b).abs().max() / a.abs().max()).item()
    print(f"relative error {err:.2e}")
    assert err <= 1e-2


def test_graph_decode_equals_eager(model_file):
    import qrun
    from qrun.runtime.cuda_graph import GraphedDecodeStep
    from qrun.runtime.generate import prefill
    outs = []
    for graph in (False, True):
        llm = qrun.load(model_file, device="cuda", progress=False, max_seq_len=64, graph=graph)
        assert isinstance(llm.decode_step, GraphedDecodeStep) == graph
        step = llm.decode_step
        torch.manual_seed(0)
        prompt = torch.randint(0, llm.model.args.vocab_size, (1, 9), device="cuda")
        logits = prefill(llm.model, prompt, torch.arange(9, device="cuda"))
        tok, pos, seq = logits.argmax(-1), torch.tensor([9], device="cuda"), []
        for _ in range(12):
            logits = step(tok.view(1, 1), pos).clone()
            seq.append(logits)
            tok = logits.argmax(-1)
            pos += 1
        outs.append(torch.stack(seq))
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_generate_on_cuda_matches_cpu_greedy(model_file):
    import qrun
    cpu = qrun.load(model_file, device="cpu", dtype="float32", progress=False)
    gpu = qrun.load(model_file, device="cuda", dtype="float32", progress=False)
    a = cpu.generate("hello world", max_new_tokens=8, temperature=0)
    b = gpu.generate("hello world", max_new_tokens=8, temperature=0)
    assert a == b


def test_fused_decode_matches_full_forward(model_file):
    """Feeding the tokens one at a time through the GPU decode step (fused RoPE + cache write, flash-decoding
    attention, fused norms, GEMV; float32, no tf32 anywhere) gives the logits of the exact float32 CPU
    forward over the whole sequence at every position."""
    import qrun
    cpu = qrun.load(model_file, device="cpu", dtype="float32", progress=False, max_seq_len=64)
    gpu = qrun.load(model_file, device="cuda", dtype="float32", progress=False, max_seq_len=64, graph=False)
    ids = torch.randint(0, cpu.model.args.vocab_size, (1, 15))
    with torch.inference_mode():
        full = cpu.model(ids)[0].float()  # (15, V), no cache
        for t in range(15):
            step = gpu.decode_step(ids[:, t:t + 1].cuda(), torch.tensor([t], device="cuda"))[0].cpu()
            assert torch.isfinite(step).all()
            assert (step - full[t]).abs().max() <= 1e-3 * full[t].abs().max(), t


def _decode_after_prefill(model_file, graph):
    """Load in float32 (max_seq 256: two cache slices of 128), prefill 120 random tokens, then decode 20 more
    one at a time (positions 120..139, across the slice boundary) -> (llm, logits (20, 1, V) on the CPU)."""
    import qrun
    from qrun.runtime.generate import prefill
    llm = qrun.load(model_file, device="cuda", dtype="float32", progress=False, max_seq_len=256, graph=graph)
    torch.manual_seed(0)
    ids = torch.randint(0, llm.model.args.vocab_size, (1, 140), device="cuda")
    with torch.inference_mode():
        prefill(llm.model, ids[:, :120], torch.arange(120, device="cuda"))
        seq = [llm.decode_step(ids[:, t:t + 1], torch.tensor([t], device="cuda")).clone() for t in range(120, 140)]
    return llm, torch.stack(seq).float().cpu()


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("graph", [False, True])
def test_fused_rope_attention_matches_unfused(model_file, graph, mode, monkeypatch):
    """QRUN_FUSED_ATTN's one-kernel RoPE + cache write + attention + combine (mode 1; mode 2: the combine kernel
    kept) gives the logits of the three-kernel path, eager and in a CUDA graph, with two cache slices (max_seq 256, the tiny config's limit: 2 slices of 128) and the token
    crossing a slice boundary (positions 120..139)."""
    from qrun import kernels
    outs = []
    for fused in (0, mode):
        monkeypatch.setattr(kernels, "FUSED_ATTN", fused)
        llm, logits = _decode_after_prefill(model_file, graph)
        outs.append(logits)
        if fused:
            assert all((m.kv_cache.counters == 0).all() for m in llm.model.modules() if hasattr(m, "kv_cache")
                       and m.kv_cache is not None)
    assert torch.isfinite(outs[1]).all()
    assert (outs[0] - outs[1]).abs().max() <= 1e-4 * outs[0].abs().max()


@pytest.mark.parametrize("graph", [False, True])
def test_rope_in_qkv_gemv_matches_unfused(model_file, graph, monkeypatch):
    """QRUN_ROPE_QKV: the qkv GEMV rotates q and k and writes k and v into the caches itself (no RoPE kernel).
    The logits of 20 decode steps after a prefill match the RoPE-kernel path, eager and in a CUDA graph, and the
    fused kernel ran wherever the qkv weight is int4 on the il4 layout (the int8 model keeps the RoPE kernel)."""
    from qrun import kernels
    from qrun.kernels import ops
    calls = []
    fused = ops.quant_linear_rope_kv_triton
    monkeypatch.setattr(ops, "quant_linear_rope_kv_triton", lambda *a: calls.append(1) or fused(*a))
    outs = []
    for on in (False, True):
        monkeypatch.setattr(kernels, "ROPE_QKV", on)
        llm, logits = _decode_after_prefill(model_file, graph)
        outs.append(logits)
    il4 = getattr(llm.model.layers[0].self_attn.qkv_proj, "layout", None) == "il4"
    assert bool(calls) == il4
    assert torch.isfinite(outs[1]).all()
    assert (outs[0] - outs[1]).abs().max() <= 1e-4 * outs[0].abs().max()


def test_tune_decode_keeps_candidates_and_results(model_file, monkeypatch):
    """qrun tune's search (runtime/tune.py): every GEMV of the step gets one of its launcher's candidates, and
    greedy decoding gives the same tokens before and after (configs change speed, not results beyond
    float32 summation order). Not stored: the test leaves the on-disk cache alone."""
    import qrun
    from qrun.kernels import ops
    from qrun.runtime.tune import tune_decode
    monkeypatch.setattr(ops, "TUNE", True)
    llm = qrun.load(model_file, device="cuda", progress=False, max_seq_len=64)
    before = llm.generate("hello world", max_new_tokens=8, temperature=0)
    r = tune_decode(llm, prompt_len=8, steps=4, store=False)
    assert r.shapes and r.before_ms > 0 and r.after_ms > 0
    for s in r.shapes:
        assert s.after in ops.gemv_candidates(s.key) and ops.get_config(s.key) == s.after
        assert len(s.times_ms) >= 1
    assert llm.generate("hello world", max_new_tokens=8, temperature=0) == before


def test_mma_gemv_decode_matches_il4(model_file, monkeypatch):
    """The decode step (bf16, CUDA graph) with the tensor-core GEMV (gemv_mma.py) for every int4 projection gives the
    logits of the same step with the il4 GEMV, up to bf16 rounding; both untuned (the first candidate)."""
    import qrun
    import qrun.kernels.ops as ops
    from qrun.runtime.generate import prefill
    if not ops._mma_ok(torch.cuda.current_device(), "int4_sym", 128, torch.bfloat16):
        pytest.skip("the tensor-core GEMV needs sm_90 and Gluon")
    monkeypatch.setattr(ops, "TUNE", False)
    outs = []
    for first in (False, True):
        monkeypatch.setattr(ops, "GEMV_MMA_FIRST", first)
        ops._tuned.clear()
        llm = qrun.load(model_file, device="cuda", dtype="bfloat16", progress=False, max_seq_len=64, graph=True)
        torch.manual_seed(0)
        prompt = torch.randint(0, llm.model.args.vocab_size, (1, 9), device="cuda")
        with torch.inference_mode():
            logits = prefill(llm.model, prompt, torch.arange(9, device="cuda"))
            tok, pos, seq = logits.argmax(-1), torch.tensor([9], device="cuda"), []
            for t in range(12):
                seq.append(llm.decode_step(tok.view(1, 1), pos).float().clone())
                tok = prompt[:, t % 9]  # the same inputs in both runs, whatever the logits
                pos += 1
        outs.append(torch.stack(seq))
        il4 = [c for k, c in ops._tuned.items() if k[1] == "gemv_il4"]  # int4 files' projections (not int8's)
        assert all(bool(c.get("MMA")) == first for c in il4), ops._tuned
    assert torch.isfinite(outs[1]).all()
    err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    assert err <= 2e-2, err
