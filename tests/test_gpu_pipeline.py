"""GPU (run on the device: pytest -m gpu tests/test_gpu_pipeline.py): greedy decoding through the run-ahead
loop (argmax and position advance inside the CUDA graph, host one step behind) gives exactly the ids of the
host loop, when it stops on the token count, on EOS and on a full KV cache; no step runs past the cache."""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

MAX_SEQ = 64


@pytest.fixture(scope="module")
def model_file(tiny_qwen2_dir, tmp_path_factory):
    from qrun.runtime.convert import ConvertOptions, convert
    out = str(tmp_path_factory.mktemp("m") / "m.stcmp")
    convert(tiny_qwen2_dir, out, ConvertOptions(bits=4), progress=False)
    return out


def _load(path, graph, **kw):
    """No EOS ids: a random model must not end a test early by chance; the EOS test sets its own."""
    import qrun
    llm = qrun.load(path, device="cuda", progress=False, graph=graph, **{"max_seq_len": MAX_SEQ, **kw})
    llm.eos_ids.clear()
    return llm


@pytest.fixture(scope="module")
def llms(model_file):
    """(graphed: run-ahead for greedy, eager: no graph, host loop)."""
    return _load(model_file, True), _load(model_file, False)


def _greedy(llm, ids, n, host_loop=False):
    """(ids, finish reason, steps the graph ran in this generation or None) for greedy decoding of n tokens."""
    from qrun.runtime.sampling import SamplingParams
    step = llm.greedy_step
    if host_loop:
        llm.greedy_step = None  # the same graph, called as a function, every token read before the next step
    try:
        out = list(llm.generate_ids(ids, SamplingParams(max_new_tokens=n, temperature=0)))
    finally:
        llm.greedy_step = step
    ran = None
    if step is not None and not host_loop:
        ran = int(step.current.pos.item()) - len(ids)  # the device position advanced once per step
    return out, llm.stats.finish_reason, ran


def _all_three(graphed, eager, ids, n):
    ahead, reason, ran = _greedy(graphed, ids, n)
    host, host_reason, _ = _greedy(graphed, ids, n, host_loop=True)
    plain, plain_reason, _ = _greedy(eager, ids, n)
    assert ahead == host, "run-ahead differs from the host loop on the same graph"
    assert ahead == plain, "run-ahead differs from the eager (no graph) host loop"
    assert reason == host_reason == plain_reason
    return ahead, reason, ran


def test_run_ahead_used_for_greedy(llms):
    from qrun.runtime.cuda_graph import GraphedDecodeStep
    graphed, eager = llms
    assert isinstance(graphed.greedy_step, GraphedDecodeStep) and graphed.greedy_step is graphed.decode_step
    assert eager.greedy_step is None


def test_run_ahead_equals_host_loop_length(llms):
    graphed, eager = llms
    ids = graphed.encode("once upon a time")
    out, reason, ran = _all_three(graphed, eager, ids, 24)
    assert len(out) == 24 and reason == "length"
    assert ran == 23  # no step past the last kept token


def test_run_ahead_equals_host_loop_eos(llms):
    graphed, eager = llms
    ids = graphed.encode("hello world")
    full, _, _ = _greedy(eager, ids, 30)
    later = next(i for i in range(4, len(full) + 1) if full[i - 1] not in full[:i - 1])
    for k in (1, later):  # EOS as the prefill's token, and as a later token's first occurrence
        for llm in llms:
            llm.eos_ids.add(full[k - 1])
        try:
            out, reason, ran = _all_three(graphed, eager, ids, 30)
        finally:
            for llm in llms:
                llm.eos_ids.discard(full[k - 1])
        assert out == full[:k - 1] and reason == "eos"
        assert ran == k  # the step past EOS ran on the device; its token was never yielded
        # That step's KV-cache row changes nothing later: a new prompt decodes over it as on a fresh run.
        other = graphed.encode("the quick brown fox")
        assert _greedy(graphed, other, 24)[0] == _greedy(eager, other, 24)[0]


@pytest.mark.parametrize("room", [1, 2, 7])
def test_run_ahead_equals_host_loop_full_cache(model_file, room):
    """The cache fills before max_new_tokens: the last step runs at max_seq_len - 2, never at or past it."""
    graphed, eager = _load(model_file, True, max_seq_len=24), _load(model_file, False, max_seq_len=24)
    ids = torch.randint(0, 300, (24 - room,), generator=torch.Generator().manual_seed(room)).tolist()
    out, reason, ran = _all_three(graphed, eager, ids, 100)
    assert len(out) == room and reason == "max_seq_len"
    assert ran == room - 1 and int(graphed.greedy_step.current.pos.item()) == 24 - 1


def test_sampling_after_run_ahead_uses_same_graph(llms):
    """Other sampling settings call the same graph as a function (inputs copied in, logits out): after a
    run-ahead generation they give what the eager step gives."""
    graphed, eager = llms
    ids = graphed.encode("hello there")
    _greedy(graphed, ids, 8)
    kw = dict(max_new_tokens=16, temperature=0.8, top_k=20, seed=5)
    assert graphed.generate("hello there", **kw) == eager.generate("hello there", **kw)
    kw = dict(max_new_tokens=16, temperature=0, repetition_penalty=1.3)
    assert graphed.generate("hello there", **kw) == eager.generate("hello there", **kw)


def test_run_ahead_batch_of_two(model_file):
    """run_ahead at batch 2 (what qrun bench --batch 2 times) equals the eager host loop, sequence by sequence."""
    from qrun.runtime.generate import prefill, run_ahead
    from qrun.runtime.sampling import greedy
    graphed = _load(model_file, True, max_batch=2)
    eager = _load(model_file, False, max_batch=2)
    prompt = torch.randint(0, graphed.model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    prompt, pos = prompt.cuda(), torch.arange(9, device="cuda")
    got = list(run_ahead(graphed.greedy_step, greedy(prefill(graphed.model, prompt, pos)), 9, 12))
    tok, p, want = greedy(prefill(eager.model, prompt, pos)), torch.tensor([9], device="cuda"), []
    for _ in range(12):
        want.append(tok.tolist())
        tok = greedy(eager.decode_step(tok.view(2, 1), p))
        p += 1
    assert got == want
    assert any(a != b for a, b in got)  # the two sequences really differ
    assert int(graphed.greedy_step.current.pos.item()) == 9 + 11


def test_reading_a_reused_slot_fails(llms):
    from qrun.runtime.cuda_graph import RING
    from qrun.runtime.generate import prefill
    from qrun.runtime.sampling import greedy
    graphed, _ = llms
    prompt = torch.tensor([graphed.encode("hello")], device="cuda")
    step = graphed.greedy_step
    first = step.start(greedy(prefill(graphed.model, prompt, torch.arange(prompt.shape[1], device="cuda"))),
                       prompt.shape[1])
    later = [step.advance() for _ in range(RING)]
    with pytest.raises(RuntimeError, match="reused"):
        first.ids()
    assert len(later[-1].ids()) == 1


def test_bench_times_both_loops(model_file):
    from qrun.runtime.bench import bench
    for pipeline in (True, False):
        r = bench(model_file, device="cuda", prompt_len=8, gen_len=8, runs=1, pipeline=pipeline)
        assert r["run_ahead"] is pipeline and r["cuda_graph"] and r["decode_tok_s"] > 0
