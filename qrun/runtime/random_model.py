"""Random-weight models with real configs, so benchmarks at real sizes need no download.

`qrun convert --random qwen2.5-7b -o x.stcmp` writes a model whose linear weights are random codes with
random block scales (drawn directly in the quantized domain: quantizing 7B random floats would take minutes
on a CPU and measures nothing extra), and whose norms and embeddings are random floats. Speed depends only
on shapes and formats, so these files time exactly like real ones. They carry a 256-token byte-level tokenizer.
"""
from __future__ import annotations

import os

import torch

from qrun.errors import QRunError
from qrun.quant import QuantizedTensor

# config.json fields of the public checkpoints (architecture only; no weights involved).
CONFIGS = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def named_config(name: str) -> dict:
    if os.path.isfile(name):
        from qrun.runtime.convert import _read_json  # a clear one-line error for a bad config.json
        return _read_json(name)
    if name not in CONFIGS:
        raise QRunError(f"unknown config {name!r}: use one of {', '.join(CONFIGS)} or a config.json path")
    cfg = dict(CONFIGS[name])
    cfg["architectures"] = ["Qwen2ForCausalLM" if cfg["model_type"] == "qwen2" else "LlamaForCausalLM"]
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def byte_tokenizer_json() -> str:
    """A 256-token byte-level BPE with no merges: enough to load and run a random model (bench feeds token
    ids; text in and out still round-trips byte by byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


class RandomSource:
    """A Source (see convert.py) of random bf16 tensors with the names and shapes of a real checkpoint."""

    random = True  # convert() draws quantized tensors directly via quantized_random()

    def __init__(self, name: str, seed: int = 0):
        self.config = named_config(name)
        self.files: dict = {"tokenizer.json": byte_tokenizer_json(), "tokenizer_config.json": None,
                            "generation_config.json": None, "chat_template": None}
        self.seed = seed
        c = self.config
        h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or h // nh
        self._shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], h)}
        bias = c["model_type"] == "qwen2"
        for layer in range(L):
            p = f"model.layers.{layer}."
            s = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (nh * hd, h), "self_attn.k_proj.weight": (nkv * hd, h),
                 "self_attn.v_proj.weight": (nkv * hd, h), "self_attn.o_proj.weight": (h, nh * hd),
                 "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
            if bias:
                s.update({"self_attn.q_proj.bias": (nh * hd,), "self_attn.k_proj.bias": (nkv * hd,),
                          "self_attn.v_proj.bias": (nkv * hd,)})
            self._shapes.update({p + k: v for k, v in s.items()})
        self._shapes["model.norm.weight"] = (h,)
        if not c.get("tie_word_embeddings", False):
            self._shapes["lm_head.weight"] = (c["vocab_size"], h)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.bfloat16

    def _gen(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))

    def get(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        g = self._gen(name)
        if name.endswith("norm.weight"):
            return (1 + 0.1 * torch.randn(shape, generator=g)).bfloat16()
        return (0.02 * torch.randn(shape, generator=g)).bfloat16()

    def quantized_random(self, name: str, encoding: str, block_size: int) -> QuantizedTensor:
        """Random codes and scales of a weight of std ~0.02, drawn directly in the stored layout."""
        n, k = self._shapes[name]
        g = self._gen(name)
        nb = -(-k // block_size)
        kp = nb * block_size
        width = kp if encoding == "int8_sym" else kp // 2
        q = torch.randint(0, 256, (n, width), generator=g, dtype=torch.uint8)
        qmax = {"int8_sym": 127, "int4_sym": 7, "int4_asym": 7.5, "nf4": 1}[encoding]
        scales = (0.06 + 0.01 * torch.rand(n, nb, generator=g)) / qmax
        parts = {"qweight": q.view(torch.int8) if encoding == "int8_sym" else q, "scales": scales.half()}
        if encoding == "int4_asym":
            parts["zeros"] = torch.full((n, nb), 8, dtype=torch.uint8)
        return QuantizedTensor(encoding, (n, k), block_size, parts)
