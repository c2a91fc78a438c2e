"""`qrun eval perplexity`: equals a direct mean-NLL computation with the Hugging Face model as oracle."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

TEXT = ("the quick brown fox jumps over the lazy dog. hello world, this is qrun counting numbers 0123456789 "
        "and symbols !?.,;: while a naive model reads héllo wörld. ") * 6 + "The end."


@pytest.fixture(scope="module")
def bf16_model(tiny_qwen2_dir, tmp_path_factory):
    from qrun.runtime.convert import ConvertOptions, convert
    out = str(tmp_path_factory.mktemp("eval") / "tiny16.stcmp")
    convert(tiny_qwen2_dir, out, ConvertOptions(bits=16), progress=False)
    return out


def oracle_nll(model_dir: str, ids: list[int], ctx: int) -> tuple[float, int]:
    """Sum of token NLLs over non-overlapping windows, from transformers' own loss."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), ctx):
            w = torch.tensor([ids[s:s + ctx]])
            if w.shape[1] < 2:
                continue
            loss = m(w, labels=w).loss.item()  # mean over the w.shape[1] - 1 predicted tokens
            total += loss * (w.shape[1] - 1)
            n += w.shape[1] - 1
    return total, n


@pytest.mark.parametrize("ctx,max_tokens", [(32, None), (24, 100)])
def test_perplexity_equals_direct_mean_nll(tiny_qwen2_dir, bf16_model, ctx, max_tokens):
    import qrun
    from qrun.runtime.evaluate import perplexity
    llm = qrun.load(bf16_model, device="cpu", max_seq_len=64, progress=False)
    ids = llm.tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > 3 * ctx and len(ids) % ctx not in (0, 1)  # several windows and a ragged tail
    if max_tokens:
        ids = ids[:max_tokens]
    nll, n = oracle_nll(tiny_qwen2_dir, ids, ctx)
    r = perplexity(llm, TEXT, ctx=ctx, max_tokens=max_tokens)
    assert r["tokens"] == n
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_cli_json(run_cli, bf16_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    rc, out, err = run_cli("eval", "perplexity", "--model", bf16_model, "--text", text, "--ctx", 32,
                           "--max-tokens", 65, "--device", "cpu", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert set(r) == {"perplexity", "tokens"}
    assert r["tokens"] == 31 + 31 + 0  # windows of 32, 32 and 1 token: the 1-token tail predicts nothing
    assert 1.0 < r["perplexity"] < 1e6


@pytest.mark.parametrize("content,msg", [("", "empty"), ("   \n", "empty"), ("a", "at least 2")])
def test_cli_bad_text(run_cli, bf16_model, tmp_path, content, msg):
    text = tmp_path / "t.txt"
    text.write_text(content)
    rc, out, err = run_cli("eval", "perplexity", "--model", bf16_model, "--text", text, "--ctx", 32,
                           "--device", "cpu")
    assert rc == 1 and out == ""
    line = err.split("\r")[-1]  # after the loader's progress bar, if any
    assert line.startswith("qrun: error:") and msg in line and line.count("\n") == 1


def test_cli_missing_files(run_cli, bf16_model, tmp_path):
    rc, _, err = run_cli("eval", "perplexity", "--model", bf16_model, "--text", tmp_path / "nope.txt")
    assert rc == 1 and "no such" in err and err.count("\n") == 1
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    rc, _, err = run_cli("eval", "perplexity", "--model", tmp_path / "nope.stcmp", "--text", text)
    assert rc == 1 and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "nope.stcmp")


@pytest.mark.gpu
def test_perplexity_and_calibration_on_gpu(tiny_qwen2_dir, bf16_model, tmp_path):
    """The same numbers on the GPU (bf16 compute there, so a loose tolerance), and GPTQ runs on the device."""
    import qrun
    from qrun.runtime.calibrate import calibrate
    from qrun.runtime.convert import ConvertOptions, convert, open_source
    from qrun.runtime.evaluate import perplexity
    cpu = perplexity(bf16_model, TEXT, ctx=32, device="cpu")
    gpu = perplexity(bf16_model, TEXT, ctx=32, device="cuda")
    assert gpu["tokens"] == cpu["tokens"]
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=0.02)
    src = open_source(tiny_qwen2_dir)
    opts = ConvertOptions(bits=4, block_size=32, method="gptq")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    q = calibrate(src, str(text), opts, calib_tokens=256, progress=False, device="cuda", ctx=32)
    out = str(tmp_path / "q.stcmp")
    convert(src, out, opts, progress=False, quantized=q)
    llm = qrun.load(out, device="cuda", max_seq_len=64, progress=False)
    assert perplexity(llm, TEXT, ctx=32)["perplexity"] < 1e6
