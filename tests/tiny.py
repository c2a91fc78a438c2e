"""Tiny random Hugging Face checkpoints for tests: written with transformers' own save_pretrained, so the
files are exactly what a real checkpoint directory holds (config.json, tokenizer.json, safetensors)."""
from __future__ import annotations

import json
import os

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, this is qrun",
          "numbers 0123456789 and symbols !?.,;:", "héllo wörld ünïcode ✓ 漢字"] * 4


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE with <|im_start|>/<|im_end|>/<|endoftext|> specials, trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def config_for(family: str, vocab_size: int, **kw):
    from transformers import LlamaConfig, Qwen2Config
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, tie_word_embeddings=True)
    common.update(kw)
    if family == "qwen2":
        return Qwen2Config(rope_theta=10000.0, **common)
    if family == "llama":
        return LlamaConfig(rope_theta=10000.0, **common)
    raise ValueError(family)


def make_tiny_hf_dir(path: str, family: str = "qwen2", dtype=torch.bfloat16, seed: int = 0, **cfg_kw) -> str:
    """Write a random tiny model of `family` (qwen2 has QKV bias) to `path` and return it."""
    from transformers import AutoModelForCausalLM
    tok = tiny_tokenizer()
    cfg = config_for(family, tok.get_vocab_size(), **cfg_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # HF inits biases to 0: make them visible to the tests
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.05)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False}, f)
    return path
