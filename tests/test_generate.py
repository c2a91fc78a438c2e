"""Generation, sampling, streaming detokenization, chat template and the generate/chat CLI."""
from __future__ import annotations

import io

import pytest
import torch

import qrun
import tiny_models as tm
from qrun.cli.main import main
from qrun.errors import QRunError
from qrun.runtime.generate import _hold_stops, run_ahead
from qrun.runtime.sampling import SamplingParams, greedy, min_p_filter, repetition_penalty, sample, top_k_filter, \
    top_p_filter
from qrun.runtime.tokenizer import StreamDecoder, Tokenizer

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
    "{% endfor %}"
)
MESSAGES = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": " hi! "},
            {"role": "user", "content": "héllo wörld 🙂"}]


@pytest.fixture(scope="module")
def tok():
    return tm.make_tokenizer()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tok):
    hf = tm.make_hf("qwen2")
    path = tm.tmpfile(tmp_path_factory.mktemp("gen"))
    tm.write_stcmp(path, hf, tm.tokenizer_files(tok, generation_config={"eos_token_id": [2, 0]}))
    return path, hf


@pytest.fixture(scope="module")
def llm(model_path):
    return qrun.load(model_path[0], device="cpu", progress=False)


# --------------------------------------------------------------------------------------- generation

def test_greedy_matches_transformers(llm, model_path):
    hf = model_path[1]
    ids = llm.encode("once upon a time")
    ours = list(llm.generate_ids(ids, SamplingParams(max_new_tokens=12, temperature=0)))
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=sorted(llm.eos_ids), pad_token_id=1)[0, len(ids):].tolist()
    want = []
    for t in out:
        if t in llm.eos_ids:
            break
        want.append(t)
    assert ours == want and len(ours) >= 3


def test_eos_ids_from_file(llm):
    assert llm.eos_ids == {2, 0}  # generation_config list ∪ config.json ∪ tokenizer eos_token (<|im_end|> = 2)


def test_seeded_sampling_is_reproducible(llm):
    kw = dict(max_new_tokens=16, temperature=1.5)
    a = list(llm.generate_ids(llm.encode("hello"), SamplingParams(seed=7, **kw)))
    b = list(llm.generate_ids(llm.encode("hello"), SamplingParams(seed=7, **kw)))
    c = list(llm.generate_ids(llm.encode("hello"), SamplingParams(seed=8, **kw)))
    assert a == b and a != c


def test_stream_concatenates_to_generate(llm):
    kw = dict(max_new_tokens=20, temperature=0.9, seed=3)
    pieces = list(llm.stream("the quick brown", **kw))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate("the quick brown", **kw)
    assert llm.stats.generated_tokens == 20 and llm.stats.finish_reason == "length"


def test_stop_string_and_eos(llm):
    full = llm.generate("hello world", max_new_tokens=20, temperature=0)
    ids = list(llm.generate_ids(llm.encode("hello world"), SamplingParams(max_new_tokens=20, temperature=0)))
    stop = full[5:8]
    cut = llm.generate("hello world", max_new_tokens=20, temperature=0, stop=[stop])
    assert cut == full[:full.find(stop)] and llm.stats.finish_reason == "stop"
    # Make the 4th greedy token an EOS id: generation ends before it.
    llm.eos_ids.add(ids[3])
    try:
        got = list(llm.generate_ids(llm.encode("hello world"), SamplingParams(max_new_tokens=20, temperature=0)))
    finally:
        llm.eos_ids.discard(ids[3])
    assert got == ids[:ids.index(ids[3])] and llm.stats.finish_reason == "eos"


def test_hold_stops_never_leaks_a_stop_string():
    out = list(_hold_stops(iter(["Hel", "lo w", "orld", "!"]), ["o wo"], lambda: None))
    assert "".join(out) == "Hell"
    out = list(_hold_stops(iter(["ab", "c", "d"]), ["cx", "zz"], lambda: None))
    assert "".join(out) == "abcd" and out[0] == "ab"


def test_prompt_longer_than_max_seq_len(model_path):
    small = qrun.load(model_path[0], device="cpu", max_seq_len=8, progress=False)
    with pytest.raises(QRunError, match="max_seq_len is 8"):
        small.generate("the quick brown fox jumps over the lazy dog", max_new_tokens=2)
    # A prompt that fits stops when the cache is full rather than writing past it.
    ids = small.encode("hello")
    got = list(small.generate_ids(ids, SamplingParams(max_new_tokens=50, temperature=0.8, seed=0)))
    assert len(ids) + len(got) <= 8


# ---------------------------------------------------------------------------------------- run-ahead

class _Read:
    def __init__(self, step, k, ids):
        self.step, self.k, self._ids = step, k, ids

    def ids(self):
        self.step.reads.append((self.k, len(self.step.positions)))  # (token k, steps enqueued by then)
        return self._ids


class EmulatedGreedyStep:
    """The run-ahead step protocol done synchronously on the CPU: what the CUDA graph does on the device (the
    decode step on the current token at the current position, its argmax becomes the current token, the
    position advances) done at once when enqueued. Records each step's position and, at each host read, how
    many steps had been enqueued."""

    def __init__(self, llm):
        self.llm, self.positions, self.reads, self.starts = llm, [], [], 0

    def start(self, token, pos):
        self.tok, self.pos = token.view(-1, 1).clone(), torch.tensor([pos])
        self.positions, self.reads = [], []
        self.starts += 1
        return _Read(self, 1, self.tok.view(-1).tolist())

    def advance(self):
        p = int(self.pos)
        assert p < self.llm.max_seq_len - 1, f"a step ran at position {p}"  # p + 1 would hold its token
        self.positions.append(p)
        self.tok = greedy(self.llm.decode_step(self.tok, self.pos)).view(-1, 1)
        self.pos += 1
        return _Read(self, len(self.positions) + 1, self.tok.view(-1).tolist())


def _loop_and_run_ahead(llm, ids, **kw):
    """Greedy ids and stats from the host loop and from the run-ahead loop (emulated step), same llm."""
    params = dict(temperature=0, **kw)
    llm.greedy_step = None
    want = list(llm.generate_ids(ids, SamplingParams(**params)))
    want_stats = llm.stats
    fake = llm.greedy_step = EmulatedGreedyStep(llm)
    try:
        got = list(llm.generate_ids(ids, SamplingParams(**params)))
    finally:
        llm.greedy_step = None
    assert fake.starts == 1
    return want, want_stats, got, llm.stats, fake


def _check_run_ahead(fake, n, n_tokens, n_read):
    """Steps ran at positions n, n+1, ... (never past n + n_tokens - 2), and each token k was read only after
    the step consuming it had been enqueued (when that step was needed at all)."""
    assert fake.positions == list(range(n, n + len(fake.positions)))
    assert len(fake.positions) <= max(n_tokens - 1, 0)
    assert [k for k, _ in fake.reads] == list(range(1, n_read + 1))
    assert all(queued == min(k, n_tokens - 1) for k, queued in fake.reads)


def test_run_ahead_equals_loop_length(llm):
    ids = llm.encode("once upon a time")
    want, ws, got, gs, fake = _loop_and_run_ahead(llm, ids, max_new_tokens=12)
    assert got == want and len(got) == 12 and ws.finish_reason == gs.finish_reason == "length"
    assert gs.generated_tokens == 12 and len(fake.positions) == 11  # no step past the last kept token
    _check_run_ahead(fake, len(ids), 12, 12)


def test_run_ahead_equals_loop_eos(llm):
    ids = llm.encode("hello world")
    full = list(llm.generate_ids(ids, SamplingParams(max_new_tokens=20, temperature=0)))
    later = next(i for i in range(4, len(full) + 1) if full[i - 1] not in full[:i - 1])
    for k in (1, later):  # the prefill's token is EOS; a later token (its first occurrence) is EOS
        eos = full[k - 1]
        llm.eos_ids.add(eos)
        try:
            want, ws, got, gs, fake = _loop_and_run_ahead(llm, ids, max_new_tokens=20)
        finally:
            llm.eos_ids.discard(eos)
        assert got == want == full[:k - 1] and ws.finish_reason == gs.finish_reason == "eos"
        assert gs.generated_tokens == k - 1
        assert len(fake.positions) == k  # the one step past EOS ran; its token was never read
        _check_run_ahead(fake, len(ids), 20, k)


@pytest.mark.parametrize("room", [1, 2, 6])
def test_run_ahead_equals_loop_full_cache(model_path, room):
    """The KV cache fills first: no step may run at or past max_seq_len (the emulated step asserts it)."""
    small = qrun.load(model_path[0], device="cpu", max_seq_len=16, progress=False)
    ids = small.encode("the quick brown fox jumps over the lazy dog")[:16 - room]
    want, ws, got, gs, fake = _loop_and_run_ahead(small, ids, max_new_tokens=50)
    assert got == want and len(got) == room
    assert ws.finish_reason == gs.finish_reason == "max_seq_len"
    assert fake.positions == list(range(len(ids), 16 - 1))  # the last step runs at max_seq_len - 2
    _check_run_ahead(fake, len(ids), room, room)


def test_run_ahead_stop_string_and_one_token(llm):
    ids = llm.encode("hello world")
    want, _, got, gs, fake = _loop_and_run_ahead(llm, ids, max_new_tokens=1)
    assert got == want and len(got) == 1 and gs.finish_reason == "length" and fake.positions == []
    full = llm.generate("hello world", max_new_tokens=20, temperature=0)
    stop = full[5:8]
    llm.greedy_step = EmulatedGreedyStep(llm)
    try:
        cut = llm.generate("hello world", max_new_tokens=20, temperature=0, stop=[stop])
    finally:
        llm.greedy_step = None
    assert cut == full[:full.find(stop)] and llm.stats.finish_reason == "stop"


def test_run_ahead_only_for_argmax(llm):
    """Sampling, and greedy with a repetition penalty, keep the host loop (the step is never started)."""
    fake = llm.greedy_step = EmulatedGreedyStep(llm)
    try:
        a = list(llm.generate_ids(llm.encode("hello"), SamplingParams(max_new_tokens=6, temperature=0.9, seed=1)))
        b = list(llm.generate_ids(llm.encode("hello"), SamplingParams(max_new_tokens=6, temperature=0,
                                                                      repetition_penalty=1.3)))
    finally:
        llm.greedy_step = None
    assert fake.starts == 0 and len(a) == len(b) == 6
    assert a == list(llm.generate_ids(llm.encode("hello"), SamplingParams(max_new_tokens=6, temperature=0.9,
                                                                          seed=1)))


class _ScriptedStep:
    """Tokens (B,) come from a script; records the order of starts, advances and reads."""

    def __init__(self, script):
        self.script, self.log, self.i = script, [], 0

    def _read(self, ids):
        step = self

        class R:
            def ids(self):
                step.log.append(("read", ids))
                return ids
        return R()

    def start(self, token, pos):
        self.log.append(("start", pos))
        return self._read(token.tolist())

    def advance(self):
        self.log.append(("advance",))
        self.i += 1
        return self._read(self.script[self.i - 1])


def test_run_ahead_batch_order_and_stop():
    script = [[5, 6], [7, 8], [9, 10], [11, 12], [13, 14]]
    s = _ScriptedStep(script)
    assert list(run_ahead(s, torch.tensor([3, 4]), 10, 4)) == [[3, 4]] + script[:3]
    a, r = ("advance",), lambda ids: ("read", ids)
    assert s.log == [("start", 10), a, r([3, 4]), a, r([5, 6]), a, r([7, 8]), r([9, 10])]
    s = _ScriptedStep(script)  # stop on [7, 8]: it is yielded (the caller drops it), the step after it ran
    assert list(run_ahead(s, torch.tensor([3, 4]), 10, 5, stop=lambda ids: ids[0] == 7)) == [[3, 4]] + script[:2]
    assert s.log == [("start", 10), a, r([3, 4]), a, r([5, 6]), a, r([7, 8])]
    assert list(run_ahead(_ScriptedStep(script), torch.tensor([3, 4]), 10, 0)) == []


# ----------------------------------------------------------------------------------------- sampling

def test_filters_match_transformers():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                         TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.tensor([[1, 5, 7], [2, 2, 9], [0, 49, 3]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(repetition_penalty(logits, seen, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, logits))
    assert torch.equal(top_k_filter(logits, 7), TopKLogitsWarper(7)(ids, logits.clone()))
    for p in (0.3, 0.8, 0.95):
        assert torch.equal(top_p_filter(logits, p).isinf(), TopPLogitsWarper(p)(ids, logits.clone()).isinf())
    assert torch.equal(min_p_filter(logits, 0.1).isinf(), MinPLogitsWarper(0.1)(ids, logits.clone()).isinf())


def test_sampling_keeps_only_allowed_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 100, generator=g).repeat(400, 1)  # 400 draws from one distribution
    top5 = set(logits[0].topk(5).indices.tolist())
    drawn = set(sample(logits, SamplingParams(temperature=2.0, top_k=5), generator=g).tolist())
    assert drawn <= top5 and len(drawn) > 1
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(400, 1)
    drawn = set(sample(probs, SamplingParams(temperature=1.0, top_p=0.7), generator=g).tolist())
    assert drawn == {0, 1}
    drawn = set(sample(probs, SamplingParams(temperature=1.0, min_p=0.2), generator=g).tolist())
    assert drawn == {0, 1, 2}
    assert sample(probs[:1], SamplingParams(temperature=0)).item() == 0


@pytest.mark.parametrize("kw,msg", [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                    ({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k"),
                                    ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition"),
                                    ({"max_new_tokens": -3}, "max_new_tokens")])
def test_bad_sampling_values(kw, msg):
    with pytest.raises(QRunError, match=msg):
        SamplingParams(**kw).validate()


# ------------------------------------------------------------------------------- tokenizer and chat

def test_stream_decoder_never_splits_utf8(tok):
    t = Tokenizer(tm.tokenizer_files(tok))
    text = "héllo wörld 日本語 🙂 naïve café €"
    ids = t.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    dec = StreamDecoder(t, t.encode("context: "))
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == t.decode(ids)


@pytest.mark.parametrize("template", [tm.CHATML, LLAMA2_TEMPLATE], ids=["chatml", "llama2"])
def test_chat_template_matches_transformers(tok, template):
    ours = Tokenizer(tm.tokenizer_files(tok, template=template))
    hf = tm.hf_tokenizer(tok, template)
    for msgs in (MESSAGES, MESSAGES[:1]):
        for gen in (True, False):
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == text
        want = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ours.encode_chat(msgs) == list(want)
    if template == LLAMA2_TEMPLATE:
        with pytest.raises(QRunError, match="roles must alternate"):
            ours.apply_chat_template(MESSAGES[1:])


def test_chat_mode_uses_template(llm):
    ids = llm.encode("hi", chat=True)
    assert llm.tokenizer.decode(ids, skip_special_tokens=False) == \
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
        "<|im_start|>assistant\n"
    assert llm.encode(messages=[{"role": "user", "content": "hi"}]) == ids
    assert isinstance(llm.generate("hi", chat=True, max_new_tokens=3, temperature=0), str)


# ---------------------------------------------------------------------------------------------- CLI

def _run(capsys, argv, monkeypatch=None, stdin=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_generate_streams_text_and_stats(capsys, llm, model_path, monkeypatch):
    base = ["generate", "--model", model_path[0], "--device", "cpu", "-n", "10", "--temperature", "0",
            "--no-progress"]
    rc, out, err = _run(capsys, base + ["--prompt", "hello world"])
    assert rc == 0
    assert out == llm.generate("hello world", max_new_tokens=10, temperature=0)  # no prompt echo
    assert err.count("\n") == 1 and "prompt tokens: 3, generated tokens: 10" in err and "decode:" in err
    rc, out2, _ = _run(capsys, base + ["--prompt", "-"], monkeypatch, stdin="hello world")
    assert rc == 0 and out2 == out


@pytest.mark.parametrize("extra,msg", [
    (["--top-p", "0"], "top_p"), (["--temperature", "-1"], "temperature"), (["--top-k", "-2"], "top_k"),
    (["--max-seq-len", "4", "--prompt", "the quick brown fox jumps over the lazy dog"], "max_seq_len is 4"),
])
def test_cli_bad_input_one_line(capsys, model_path, extra, msg):
    argv = ["generate", "--model", model_path[0], "--device", "cpu", "--no-progress", "--prompt", "hi"] + extra
    rc, out, err = _run(capsys, argv)
    assert rc != 0 and out == ""
    assert err.startswith("qrun: error: ") and err.count("\n") == 1 and msg in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cli_cuda_without_gpu(capsys, model_path):
    rc, _, err = _run(capsys, ["generate", "--model", model_path[0], "--device", "cuda", "--prompt", "x"])
    assert rc == 1 and "no CUDA GPU" in err and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["no-tokenizer", "unknown-arch"])
def test_cli_bad_model_file(capsys, tmp_path, tok, kind):
    path = tm.tmpfile(tmp_path)
    hf = tm.make_hf("llama", num_hidden_layers=1)
    if kind == "no-tokenizer":
        tm.write_stcmp(path, hf, {"tokenizer.json": None})
    else:
        tm.write_stcmp(path, hf, tm.tokenizer_files(tok), config_over={"model_type": "mamba"})
    rc, out, err = _run(capsys, ["generate", "--model", path, "--device", "cpu", "--prompt", "x", "--no-progress"])
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert ("holds no tokenizer" if kind == "no-tokenizer" else "unsupported architecture 'mamba'") in err


def test_cli_missing_model_file(capsys, tmp_path):
    rc, _, err = _run(capsys, ["generate", "--model", str(tmp_path / "nope.stcmp"), "--device", "cpu",
                               "--prompt", "x"])
    assert rc == 1 and "no such file" in err and err.count("\n") == 1


def test_cli_chat_session(capsys, llm, model_path, monkeypatch):
    turns = "hello there\n/reset\nhello there\nsecond turn\n/exit\nnever read\n"
    rc, out, err = _run(capsys, ["chat", "--model", model_path[0], "--device", "cpu", "-n", "6",
                                 "--temperature", "0", "--no-progress"], monkeypatch, stdin=turns)
    assert rc == 0 and "history cleared" in err
    replies = out.split("\n")[:3]
    first = llm.generate(messages=[{"role": "user", "content": "hello there"}], max_new_tokens=6,
                         temperature=0)
    second = llm.generate(messages=[{"role": "user", "content": "hello there"},
                                    {"role": "assistant", "content": first},
                                    {"role": "user", "content": "second turn"}], max_new_tokens=6, temperature=0)
    assert replies == [first, first, second]  # /reset really forgot the first turn; history is kept otherwise


@pytest.mark.slow
def test_demo_greedy_matches_transformers():
    """The demo model (INT4): greedy text equals transformers' on the same dequantized weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from qrun.runtime import demo
    try:
        path = demo.demo_model_path(progress=False)
    except Exception as e:  # offline
        pytest.skip(f"demo model not available: {e}")
    llm = qrun.load(path, device="cpu", max_seq_len=64, progress=False)
    hf = LlamaForCausalLM(LlamaConfig(**llm.config)).float().eval()
    hf.load_state_dict(tm.file_weights(path), strict=True)
    ids = llm.encode("What is the capital of France?", chat=True)
    ours = list(llm.generate_ids(ids, SamplingParams(max_new_tokens=12, temperature=0)))
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=sorted(llm.eos_ids), pad_token_id=0)[0, len(ids):].tolist()
    theirs = theirs[:next((i for i, t in enumerate(theirs) if t in llm.eos_ids), len(theirs))]
    assert ours == theirs and len(ours) >= 5
    assert "Paris" in llm.tokenizer.decode(ours)


def test_chunked_prefill_equals_one_shot(tmp_path):
    """A prompt prefilled in chunks (each attending to the cache the earlier ones wrote) gives the logits and
    the cache of a one-shot prefill, so long prompts need no prompt-sized activation buffer."""
    import qrun.runtime.generate as g
    path = tm.tmpfile(tmp_path)
    tm.write_stcmp(path, tm.make_hf("qwen2"), tm.tokenizer_files(tm.make_tokenizer()))
    ids = torch.randint(0, tm.VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))
    outs = []
    for chunk in (100, 3):
        model = qrun.load(path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=32).model
        last = g.prefill(model, ids, torch.arange(11), chunk=chunk)
        nxt = g.decode_one(model, ids[:, :1], torch.tensor([11]))
        outs.append((last, nxt))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


def test_kv_cache_too_big_names_the_largest_that_fits():
    from qrun.errors import QRunError
    from qrun.models.llama import ModelArgs
    from qrun.runtime.loader import KV_WORKSPACE, check_kv_cache_fits
    a = ModelArgs(model_type="qwen2", vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  intermediate_size=128)
    per_pos = 2 * 2 * 2 * 16 * 2  # K and V x layers x kv heads x head_dim x bf16 bytes
    check_kv_cache_fits(a, 1000, torch.bfloat16, KV_WORKSPACE + 1000 * per_pos)  # fits exactly
    with pytest.raises(QRunError, match=r"use --max-seq-len 999 or less"):
        check_kv_cache_fits(a, 1000, torch.bfloat16, KV_WORKSPACE + 1000 * per_pos - 1)


def test_batched_decode_equals_one_at_a_time(tmp_path):
    """Two sequences prefilled and decoded together (one KV cache row each) give the logits each gives
    alone: what `qrun bench --batch` measures is the same computation."""
    import qrun.runtime.generate as g
    path = tm.tmpfile(tmp_path)
    tm.write_stcmp(path, tm.make_hf("llama"), tm.tokenizer_files(tm.make_tokenizer()), encoding="int4_sym")
    ids = torch.randint(0, tm.VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    nxt = torch.randint(0, tm.VOCAB, (2, 3), generator=torch.Generator().manual_seed(6))

    def run(batch_ids, batch_next, max_batch):
        llm = qrun.load(path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=16, max_batch=max_batch)
        out = [g.prefill(llm.model, batch_ids, torch.arange(9))]
        for t in range(3):
            out.append(llm.decode_step(batch_next[:, t:t + 1], torch.tensor([9 + t])))
        return torch.stack(out, 1)  # (B, 4, V)

    both = run(ids, nxt, 2)
    alone = torch.cat([run(ids[i:i + 1], nxt[i:i + 1], 1) for i in range(2)])
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both[0], both[1])  # the two sequences really differ
