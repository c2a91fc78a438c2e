"""The loader: converter round trip, bounded streaming, and one clear error per bad file or option."""
from __future__ import annotations

import json

import pytest
import torch

import qrun
import tiny_models as tm
from qrun.errors import QRunError
from qrun.runtime.loader import load, resolve_device


@pytest.fixture(scope="module")
def tok():
    return tm.make_tokenizer()


@pytest.fixture(scope="module")
def hf():
    return tm.make_hf("llama", tie_word_embeddings=True)


def _ids():
    return torch.randint(0, tm.VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits,scheme,emb", [(8, "sym", "int8"), (4, "asym", "keep"), (16, "sym", "keep")])
def test_converter_round_trip(tmp_path, tok, hf, bits, scheme, emb):
    """HF dir -> qrun.runtime.convert.convert -> qrun.load matches transformers on the file's weights."""
    from qrun.runtime.convert import ConvertOptions, convert
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    tm.hf_tokenizer(tok).save_pretrained(src)
    path = str(tmp_path / "m.stcmp")
    convert(str(src), path, ConvertOptions(bits=bits, block_size=32, scheme=scheme, embeddings=emb),
            progress=False)
    oracle = tm.set_weights(tm.make_hf("llama", tie_word_embeddings=True), tm.file_weights(path))
    for dequantize in (False, True):
        llm = load(path, device="cpu", dtype=torch.float32, dequantize=dequantize, progress=False)
        with torch.inference_mode():
            assert (llm.model(_ids()) - oracle(_ids()).logits).abs().max() <= 1e-4
    assert llm.tokenizer.chat_template == tm.CHATML
    assert llm.encode("hi", chat=True) == list(tm.hf_tokenizer(tok).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)["input_ids"])


def test_small_prefetch_window_and_threads(tmp_path, tok, hf):
    """One part in flight at a time, one thread, tiny chunks: same model as the default streaming."""
    path = tm.tmpfile(tmp_path)
    tm.write_stcmp(path, hf, tm.tokenizer_files(tok), encoding="int4_sym", block_size=32)
    a = load(path, device="cpu", progress=False, dequantize=False)
    b = load(path, device="cpu", progress=False, dequantize=False, threads=1, prefetch_bytes=1)
    with torch.inference_mode():
        assert torch.equal(a.model(_ids()), b.model(_ids()))
    assert b.max_seq_len == 256  # min(max_position_embeddings, 4096)


def _bad_file(tmp_path, tok, hf, files=None, config_over=None, drop=()):
    path = tm.tmpfile(tmp_path)
    tm.write_stcmp(path, hf, tm.tokenizer_files(tok) if files is None else files, config_over=config_over,
                   drop=drop)
    return path


def test_errors(tmp_path, tok, hf):
    with pytest.raises(QRunError, match="unsupported architecture 'gpt_neox'"):
        load(_bad_file(tmp_path, tok, hf, config_over={"model_type": "gpt_neox"}), progress=False)
    no_tok = _bad_file(tmp_path, tok, hf, files={"tokenizer.json": None})
    with pytest.raises(QRunError, match="holds no tokenizer"):
        load(no_tok, progress=False, require_tokenizer=True)
    bare = load(no_tok, progress=False)  # benchmarks load random-weight files that carry no tokenizer
    assert bare.tokenizer is None and bare.eos_ids == {2}
    with pytest.raises(QRunError, match="holds no tokenizer"):
        bare.generate("hi")
    with pytest.raises(QRunError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load(_bad_file(tmp_path, tok, hf, drop=("model.layers.1.mlp.up_proj.weight",)), progress=False)
    with pytest.raises(QRunError, match="no lm_head.weight"):
        load(_bad_file(tmp_path, tok, hf, config_over={"tie_word_embeddings": False},
                       drop=("lm_head.weight",)), progress=False)
    with pytest.raises(QRunError, match="sliding window 64"):
        load(_bad_file(tmp_path, tok, hf, config_over={"model_type": "mistral", "sliding_window": 64}),
             progress=False)
    good = _bad_file(tmp_path, tok, hf)
    with pytest.raises(QRunError, match="beyond the model's max_position_embeddings 256"):
        load(good, max_seq_len=1000, progress=False)
    with pytest.raises(QRunError, match="unknown dtype"):
        load(good, dtype="int3", progress=False)
    with pytest.raises(QRunError, match="unknown device|unsupported device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(QRunError, match="no CUDA GPU"):
            qrun.load(good, device="cuda")
    llm = qrun.load(good, progress=False)  # the package-level entry point
    assert llm.config["model_type"] == "llama" and llm.device.type == "cpu"
    assert llm.model.embed_tokens.weight.dtype == torch.float32
    assert llm.eos_ids == {2}
    json.dumps(llm.header["config"])


@pytest.mark.gpu
def test_cuda_load_matches_cpu(tmp_path, tok, hf):
    """Pinned-buffer streaming to the GPU and the packed QuantLinear path give the CPU's logits."""
    path = tm.tmpfile(tmp_path)
    tm.write_stcmp(path, hf, tm.tokenizer_files(tok), encoding="int4_sym", block_size=32, embeddings="int8_sym")
    cpu = load(path, device="cpu", progress=False)
    gpu = load(path, device="cuda", dtype=torch.float32, progress=False)
    with torch.inference_mode():
        a = cpu.model(_ids())
        b = gpu.model(_ids().cuda()).cpu()
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()
    kw = dict(max_new_tokens=8, temperature=0)
    assert gpu.generate("hello world", **kw) == cpu.generate("hello world", **kw)
