"""The Llama-family model against Hugging Face transformers (float32, tiny random configs)."""
from __future__ import annotations

import pytest
import torch

import qrun
import tiny_models as tm
from qrun.errors import QRunError
from qrun.models import ModelArgs
from qrun.models.linear import Concat, FusedSiluMul, Linear, QuantEmbedding, QuantLinear, SiluMul

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CONFIGS = {
    "qwen2-bias": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "llama": ("llama", {}),
    "llama-mha-bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True}),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_theta": 500000.0, **LLAMA3}}),
    "linear-rope": ("llama", {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}}),
}


@pytest.fixture(scope="module")
def tok():
    return tm.make_tokenizer()


def _load(tmp_path, hf, tok, **kw):
    wkw = {k: kw.pop(k) for k in list(kw) if k in ("encoding", "embeddings", "double_quant", "block_size")}
    path = tm.tmpfile(tmp_path)
    ref = tm.write_stcmp(path, hf, tm.tokenizer_files(tok), **wkw)
    llm = qrun.load(path, device="cpu", dtype=torch.float32, progress=False, **kw)
    return llm, ref


def _ids(n=20, seed=1):
    return torch.randint(0, tm.VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _cached_logits(model, ids, split, trim=False):
    """Prefill ids[:, :split], then one token at a time through the KV cache: logits (1, T, V).
    trim: pass kv_len so attention reads only the filled part of the cache (the eager CPU path)."""
    out = [model(ids[:, :split], torch.arange(split), kv_len=split if trim else None)]
    for t in range(split, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], torch.tensor([t]), kv_len=t + 1 if trim else None))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, tok, name):
    kind, over = CONFIGS[name]
    hf = tm.make_hf(kind, **over)
    llm, _ = _load(tmp_path, hf, tok)
    ids = _ids()
    with torch.inference_mode():
        want = hf(ids).logits
        full = llm.model(ids)
        cached = _cached_logits(llm.model, ids, 7)
        trimmed = _cached_logits(llm.model, ids, 4, trim=True)
    assert want.abs().max() > 1  # the oracle's logits are not all ~0, so a 1e-4 match means something
    assert (full - want).abs().max() <= 1e-4
    assert (cached - want).abs().max() <= 1e-4
    assert (trimmed - want).abs().max() <= 1e-4
    # Dense layers everywhere, q/k/v and gate/up fused into one weight each.
    attn = llm.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, Linear) and isinstance(llm.model.layers[0].mlp.gate_up_proj, FusedSiluMul)
    assert (attn.qkv_proj.bias is not None) == (kind == "qwen2" or over.get("attention_bias", False))


def test_rope_scaling_is_applied(tmp_path, tok):
    """Positions past original_max_position_embeddings give different logits with llama3 scaling: the
    match above is not one that ignoring the scaling would also pass."""
    scaled = tm.make_hf("llama", rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    plain = tm.make_hf("llama", rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    ids = _ids(30)
    with torch.inference_mode():
        assert (scaled(ids).logits - plain(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("encoding", ["int8_sym", "int4_sym", "int4_asym", "nf4"])
@pytest.mark.parametrize("dequantize", [False, True], ids=["packed", "dequantized"])
def test_quantized_matches_dequantized_reference(tmp_path, tok, encoding, dequantize):
    hf = tm.make_hf("qwen2")
    llm, ref = _load(tmp_path, hf, tok, encoding=encoding, dequantize=dequantize)
    tm.set_weights(hf, ref)  # the oracle runs on our reference-dequantized weights
    qkv = llm.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, Linear if dequantize else QuantLinear)
    ids = _ids()
    with torch.inference_mode():
        want = hf(ids).logits
        assert (llm.model(ids) - want).abs().max() <= 1e-4
        assert (_cached_logits(llm.model, ids, 5) - want).abs().max() <= 1e-4


def test_mixed_encodings_and_quantized_tied_embeddings(tmp_path, tok):
    """q in int8, k/v in int4, gate lossless: nothing can be fused, so the layers stay separate; the tied
    lm_head reads the int8 embedding table through quant_linear."""
    hf = tm.make_hf("qwen2", tie_word_embeddings=True)

    def enc(name):
        if "q_proj" in name:
            return "int8_sym"
        return None if "gate_proj" in name else "int4_sym"

    llm, ref = _load(tmp_path, hf, tok, encoding=enc, embeddings="int8_sym", dequantize=False)
    tm.set_weights(hf, ref)
    m = llm.model
    assert isinstance(m.layers[0].self_attn.qkv_proj, Concat)
    assert isinstance(m.layers[0].mlp.gate_up_proj, SiluMul)
    assert isinstance(m.embed_tokens, QuantEmbedding) and isinstance(m.lm_head, QuantLinear)
    assert m.lm_head.qweight is m.embed_tokens.qweight  # shared, not copied
    ids = _ids()
    with torch.inference_mode():
        want = hf(ids).logits
        assert (m(ids) - want).abs().max() <= 1e-4
        assert (_cached_logits(m, ids, 9) - want).abs().max() <= 1e-4


def test_double_quant_scales(tmp_path, tok):
    """Double-quantized scales are expanded to fp16 at load: within fp16 rounding of the reference."""
    hf = tm.make_hf("llama")
    llm, ref = _load(tmp_path, hf, tok, encoding="int4_asym", double_quant=True, dequantize=False,
                     embeddings="int4_sym")
    tm.set_weights(hf, ref)
    assert llm.model.layers[0].self_attn.qkv_proj.scales.dtype == torch.float16
    ids = _ids()
    with torch.inference_mode():
        want = hf(ids).logits
        got = llm.model(ids)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_model_args_from_config_errors():
    base = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    with pytest.raises(QRunError, match="unsupported architecture 'gpt2'"):
        ModelArgs.from_config({**base, "model_type": "gpt2"})
    with pytest.raises(QRunError, match="rope scaling type 'yarn'"):
        ModelArgs.from_config({**base, "model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 2.0}})
    a = ModelArgs.from_config({**base, "model_type": "mistral", "rope_theta": 1e6, "sliding_window": None})
    assert a.rope_theta == 1e6 and a.head_dim == 4 and a.n_kv_heads == 2 and a.sliding_window is None
    q = ModelArgs.from_config({**base, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert q.sliding_window is None and q.qkv_bias
