"""Tiny random Hugging Face models and .stcmp files built from them, for the model/loader/generate tests.

The .stcmp writer here follows the header spec directly (qrun.runtime.stcmp.Writer + qrun.quant) so the
loader is tested against the format, per tensor encodings included (mixed q/k/v, quantized embeddings),
independently of the converter.
"""
from __future__ import annotations

import json
import os

import torch

CHATML = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 320  # model rows; the tokenizer uses ~300 of them
TRAIN_TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
              "héllo wörld 日本語 🙂 naïve café", "once upon a time there was a tiny model"] * 20


def make_tokenizer():
    """A byte-level BPE (GPT-2 / Qwen style: every byte is a token, so any text encodes) with a few merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    return tok


def hf_tokenizer(tok, template=CHATML):
    from transformers import PreTrainedTokenizerFast
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                pad_token="<|endoftext|>")
    t.chat_template = template
    return t


def tokenizer_files(tok, template=CHATML, generation_config=None):
    return {"tokenizer.json": tok.to_str(),
            "tokenizer_config.json": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                      "pad_token": "<|endoftext|>"},
            "generation_config.json": generation_config, "chat_template": template}


def make_hf(kind="qwen2", seed=0, **over):
    """A float32 random model; weights drawn wider than HF's init so that any wiring bug moves the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
                eos_token_id=SPECIALS.index("<|im_end|>"), bos_token_id=0, tie_word_embeddings=False)
    base.update(over)
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(**base)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = model_cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return m


def write_stcmp(path, hf_model, files, encoding=None, block_size=32, embeddings=None, double_quant=False,
                drop=(), config_over=None):
    """Write hf_model as a .stcmp. encoding: None (bf16? no: fp32 lossless) or an encoding string for every
    2-D linear weight, or a callable name -> encoding|None. embeddings: encoding for embed_tokens/lm_head.
    Returns the state dict our reference dequantization gives (what the HF oracle should be set to)."""
    from qrun.quant import dequantize, quantize
    from qrun.runtime.stcmp import Writer
    cfg = json.loads(hf_model.config.to_json_string())
    cfg.update(config_over or {})
    ref = {}
    with Writer(path, chunk_bytes=4096) as w:  # small chunks: the loader's chunked path is exercised
        for name, t in hf_model.state_dict().items():
            if name in drop or (name == "lm_head.weight" and cfg.get("tie_word_embeddings")):
                continue
            t = t.detach().float()
            enc = None
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                enc = embeddings
            elif t.dim() == 2:
                enc = encoding(name) if callable(encoding) else encoding
            if enc is None:
                w.add(name, {"data": t}, "fp32", list(t.shape), "float32")
                ref[name] = t
            else:
                qt = quantize(t, enc, block_size, double_quant=double_quant, name=name)
                w.add(name, qt.parts, enc, list(t.shape), "float32", block_size=block_size)
                ref[name] = dequantize(qt)
        w.close({"qrun_version": "test", "config": cfg, "files": files,
                 "quantization": {"bits": 16 if encoding is None else 4, "block_size": block_size}})
    if cfg.get("tie_word_embeddings"):
        ref["lm_head.weight"] = ref["model.embed_tokens.weight"]
    return ref


def set_weights(hf_model, ref):
    with torch.no_grad():
        for name, p in hf_model.state_dict().items():
            if name in ref:
                p.copy_(ref[name])
    return hf_model


def file_weights(path):
    """Every tensor of a .stcmp as our reference dequantization reads it (float32): the oracle's weights."""
    from qrun.quant import dequantize_parts
    from qrun.runtime.stcmp import Reader
    out = {}
    with Reader(path) as r:
        for name, t in r.tensors.items():
            parts = r.read_parts(name)
            out[name] = parts["data"].float() if "data" in parts else dequantize_parts(
                t.encoding, parts, tuple(t.shape), t.entry["block_size"])
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def tmpfile(tmp_path, name="m.stcmp"):
    return os.fspath(tmp_path / name)


def make_hf_dir(path, kind="qwen2", dtype=torch.bfloat16, **over):
    """A checkpoint directory as transformers writes it (config.json, safetensors, tokenizer.json and
    tokenizer config with the chat template), of a tiny random model with tied embeddings."""
    over.setdefault("tie_word_embeddings", True)
    make_hf(kind, **over).to(dtype).save_pretrained(path, safe_serialization=True)
    hf_tokenizer(make_tokenizer()).save_pretrained(path)
    return str(path)
