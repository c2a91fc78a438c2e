"""Import a GGUF file (llama.cpp's format) as a converter Source: Hugging Face names, layout and files.

GGUFSource(path) reads the metadata and tensor index with the `gguf` package (memory-mapped) and
dequantizes one tensor at a time when the converter asks for it, so a whole model is never held twice.

What llama.cpp's converter changed, and how it is undone here:
- Names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight` etc. (GGUF_TO_HF).
- Shapes: GGUF lists dims innermost first ([in, out]); the numpy view is already (out, in) = HF layout.
- Rotary pairing (llama architecture only): q_proj/k_proj rows were permuted per head from HF's
  "rotate half" order (first half, second half) into interleaved pairs (0, half), (1, half+1), ...
  `_unpermute` reverses it. Qwen2 files are not permuted.
- Config and tokenizer: rebuilt from `<arch>.*` and `tokenizer.ggml.*` metadata (config.json,
  tokenizer.json via the `tokenizers` library, tokenizer_config.json, generation_config.json).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import torch

from qrun.errors import QRunError

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IGNORED = {"rope_freqs.weight"}  # llama3 rope factors: folded into config["rope_scaling"]

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp applies them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# "smollm" is grouped with starcoder in llama.cpp: every digit is its own piece first, then GPT-2's regex
# (the same as SmolLM2's own tokenizer.json: Digits(individual_digits) + ByteLevel).
_PRE_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT], "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "refact": [r"\p{N}", _GPT2_SPLIT], "codeshell": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT], "llama-bpe": [_LLAMA3_SPLIT], "llama-v3": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT], "dbrx": [_LLAMA3_SPLIT], "falcon3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "deepseek-r1-qwen": [_QWEN2_SPLIT],
}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows (weight (heads*head_dim, in) or bias (heads*head_dim,)).

    llama.cpp: w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2); the inverse swaps the same axes
    of the (n_head, head_dim // 2, 2, ...) view.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    if hasattr(f, "contents"):
        return f.contents()
    # gguf < 0.11 has no contents(): decode the value parts (strings are UTF-8 bytes, numbers 1-element arrays)
    from gguf import GGUFValueType as T
    conv = lambda part, t: bytes(part).decode("utf-8") if t == T.STRING else part.tolist()[0]  # noqa: E731
    vals = [f.parts[i] for i in f.data]
    if f.types[0] == T.ARRAY:
        return [conv(v, f.types[-1]) for v in vals]
    return conv(vals[0], f.types[0])


class GGUFSource:
    """A GGUF file as a converter Source (see convert.py): config, files, names(), shape(), dtype(), get()."""

    def __init__(self, path: str):
        import gguf
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise QRunError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise QRunError(f"{self.path}: not a GGUF file (no GGUF magic at the start)")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # truncated header or tensor data, bad value types: numpy's message says nothing useful
            raise QRunError(f"{self.path}: truncated or corrupt GGUF file (the gguf reader cannot parse it; "
                            f"set QRUN_DEBUG=1 for details)") from e
        r = self._reader
        self.arch = _field(r, "general.architecture")
        if self.arch not in SUPPORTED_ARCHS:
            raise QRunError(f"{self.path}: unsupported GGUF architecture {self.arch} "
                            f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        self._tensors = {t.name: t for t in r.tensors}
        self._hf_to_gguf: dict[str, str] = {}
        for gname in self._tensors:
            if gname in _IGNORED:
                continue
            self._hf_to_gguf[_hf_name(gname, self.path)] = gname
        self.config = self._build_config()
        self.files = self._build_files()

    # --------------------------------------------------------------------------------- tensors
    def names(self) -> list[str]:
        return list(self._hf_to_gguf)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF dims are innermost first: [in, out] -> HF (out, in)
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def dtype(self, name: str) -> torch.dtype:
        self._tensor(name)
        return torch.bfloat16

    def get(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32 by `gguf`, un-permuted if needed, then rounded to bfloat16."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize
        t = self._tensor(name)
        qtype = Q(t.tensor_type)
        try:
            if qtype == Q.F32:
                w = np.array(t.data, dtype=np.float32)  # a copy: the memmap is read-only
            else:
                w = dequantize(t.data, qtype)
        except NotImplementedError:
            raise QRunError(f"{self.path}: tensor {t.name} has quant type {qtype.name}, "
                            f"which the gguf package cannot dequantize") from None
        w = w.reshape(self.shape(name))
        if self.arch == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            heads = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            w = _unpermute(w, heads)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(torch.bfloat16)

    def _tensor(self, name: str):
        g = self._hf_to_gguf.get(name)
        if g is None:
            raise KeyError(name)
        return self._tensors[g]

    # --------------------------------------------------------------------------------- config
    def _build_config(self) -> dict[str, Any]:
        r, a = self._reader, self.arch

        def meta(key, default=None, required=True):
            v = _field(r, f"{a}.{key}", default)
            if v is None and required:
                raise QRunError(f"{self.path}: GGUF metadata {a}.{key} is missing")
            return v

        hidden = int(meta("embedding_length"))
        heads = int(meta("attention.head_count"))
        kv_heads = meta("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer counts: only uniform ones make sense here
            if len(set(kv_heads)) != 1:
                raise QRunError(f"{self.path}: per-layer KV head counts are not supported")
            kv_heads = kv_heads[0]
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise QRunError(f"{self.path}: no token_embd.weight tensor")
        vocab = int(embd.shape[1])  # GGUF [hidden, vocab]
        bos = _field(r, "tokenizer.ggml.bos_token_id")
        eos = _field(r, "tokenizer.ggml.eos_token_id")
        cfg: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHS[a]],
            "model_type": a,
            "hidden_size": hidden,
            "intermediate_size": int(meta("feed_forward_length")),
            "num_hidden_layers": int(meta("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "hidden_act": "silu",
            "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(meta("context_length", 2048)),
            "vocab_size": vocab,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": None if bos is None else int(bos),
            "eos_token_id": None if eos is None else int(eos),
            "torch_dtype": "bfloat16",
        }
        key_len = meta("attention.key_length", None, required=False)
        if key_len is not None and int(key_len) != hidden // heads:
            cfg["head_dim"] = int(key_len)
        if a == "llama":
            cfg["attention_bias"] = "blk.0.attn_q.bias" in self._tensors
            cfg["mlp_bias"] = False
        else:
            cfg["use_sliding_window"] = False
        rope_scaling = self._rope_scaling(meta, cfg)
        if rope_scaling is not None:
            cfg["rope_scaling"] = rope_scaling
        return cfg

    def _rope_scaling(self, meta, cfg) -> dict[str, Any] | None:
        kind = meta("rope.scaling.type", None, required=False)
        factor = meta("rope.scaling.factor", None, required=False)
        if kind in (None, "none") and "rope_freqs.weight" not in self._tensors:
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            orig = meta("rope.scaling.original_context_length", None, required=False)
            out = {"rope_type": "yarn", "factor": float(factor)}
            if orig is not None:
                out["original_max_position_embeddings"] = int(orig)
            return out
        if kind not in (None, "none"):
            raise QRunError(f"{self.path}: unsupported rope scaling type {kind}")
        return self._llama3_rope(cfg)

    def _llama3_rope(self, cfg) -> dict[str, Any]:
        """llama.cpp stores Llama 3.1+ rope scaling only as per-frequency factors (rope_freqs.weight).

        The HF parameters are not in the file, so try the published Llama 3.x settings and keep the one
        that reproduces the stored factors exactly; anything else is refused rather than guessed.
        """
        from gguf.quants import dequantize
        t = self._tensors["rope_freqs.weight"]
        stored = dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64)
        head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * np.pi / inv_freq
        for factor in (8.0, 16.0, 32.0):
            low, high, orig = 1.0, 4.0, 8192
            smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
            factors = 1.0 / ((1 - smooth) / factor + smooth)  # inv_freq / new_inv_freq
            factors = np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, factors))
            if factors.shape == stored.shape and np.allclose(factors, stored, rtol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": orig}
        raise QRunError(f"{self.path}: rope_freqs.weight matches no known llama3 rope scaling")

    # --------------------------------------------------------------------------------- tokenizer
    def _build_files(self) -> dict[str, Any]:
        r = self._reader
        model = _field(r, "tokenizer.ggml.model")
        tokens = _field(r, "tokenizer.ggml.tokens")
        if model is None or not tokens:
            raise QRunError(f"{self.path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
        types = _field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
        if model == "gpt2":
            tok, add_bos = self._byte_level_bpe(tokens, types), bool(_field(r, "tokenizer.ggml.add_bos_token", False))
        elif model == "llama":
            tok, add_bos = self._sentencepiece_bpe(tokens, types), bool(_field(r, "tokenizer.ggml.add_bos_token", True))
        else:
            raise QRunError(f"{self.path}: unsupported GGUF tokenizer model {model} (supported: gpt2, llama)")
        add_eos = bool(_field(r, "tokenizer.ggml.add_eos_token", False))

        def token(key):
            i = _field(r, f"tokenizer.ggml.{key}")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        from tokenizers.processors import TemplateProcessing
        single, specials = "$A", []
        if add_bos and bos is not None:
            single, specials = f"{bos} {single}", specials + [(bos, tokens.index(bos))]
        if add_eos and eos is not None:
            single, specials = f"{single} {eos}", specials + [(eos, tokens.index(eos))]
        tok.post_processor = TemplateProcessing(single=single, special_tokens=sorted(set(specials)))

        chat_template = _field(r, "tokenizer.chat_template")
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos, "eos_token": eos, "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
            "add_bos_token": add_bos, "add_eos_token": add_eos,
            "model_max_length": self.config["max_position_embeddings"],
            "chat_template": chat_template,
        }
        gen = {"bos_token_id": self.config["bos_token_id"], "eos_token_id": self.config["eos_token_id"]}
        # llama.cpp also stops on an end-of-turn token the file names (e.g. <|eot_id|>).
        eot = [int(i) for k in ("eot_token_id", "eom_token_id")
               if (i := _field(r, f"tokenizer.ggml.{k}")) is not None]
        if eot:
            gen["eos_token_id"] = sorted({gen["eos_token_id"], *eot} - {None})
        return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": tok_config,
                "generation_config.json": gen, "special_tokens_map.json": None, "chat_template": chat_template}

    def _add_special(self, tok, tokens, types):
        from tokenizers import AddedToken
        control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        if control:
            tok.add_special_tokens(control)
        if user:
            tok.add_tokens(user)
        if tok.get_vocab_size(with_added_tokens=True) > len(tokens):
            raise QRunError(f"{self.path}: the GGUF vocabulary has duplicate special tokens")

    def _byte_level_bpe(self, tokens: list[str], types: list[int]):
        """GPT-2 style byte-level BPE: the vocabulary and merges as stored, the split regex by tokenizer.ggml.pre."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        pre = _field(self._reader, "tokenizer.ggml.pre", "default")
        if pre not in _PRE_SPLITS:
            raise QRunError(f"{self.path}: unsupported GGUF pre-tokenizer {pre} "
                            f"(supported: {', '.join(sorted(_PRE_SPLITS))})")
        merges = _field(self._reader, "tokenizer.ggml.merges")
        if not merges:
            raise QRunError(f"{self.path}: byte-level GGUF tokenizer without tokenizer.ggml.merges")
        alphabet = set(_bytes_to_unicode().values())
        b2u = _bytes_to_unicode()
        vocab: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            # llama.cpp stores some added tokens as raw text; spell them in the byte alphabet for BPE
            key = t if ty in (_CONTROL, _USER_DEFINED) or set(t) <= alphabet else "".join(b2u[b] for b in t.encode())
            vocab.setdefault(key, i)  # a duplicate spelling keeps its first id
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _PRE_SPLITS[pre]]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        self._add_special(tok, tokens, types)
        return tok

    def _sentencepiece_bpe(self, tokens: list[str], types: list[int]):
        """SentencePiece BPE (tokenizer.ggml.model "llama") the way HF's LlamaTokenizerFast is built:
        '▁' for spaces, byte fallback <0xNN> tokens, merges from the file or derived from the scores."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        r = self._reader
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        merges = _field(r, "tokenizer.ggml.merges")
        if merges:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
        else:
            scores = _field(r, "tokenizer.ggml.scores")
            if not scores:
                raise QRunError(f"{self.path}: SentencePiece GGUF tokenizer without merges or scores")
            pairs = _merges_from_scores(tokens, scores, types)
        unk = _field(r, "tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None if unk is None else tokens[int(unk)],
                                   fuse_unk=True, byte_fallback=True))
        add_prefix = bool(_field(r, "tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_prefix else "never",
                                                     split=False)
        tok.normalizer = None
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        self._add_special(tok, tokens, types)
        return tok


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: a merge (a, b) exists when a, b and a+b are all normal tokens,
    ranked by the score of a+b (higher merges first), as HF's converter derives them."""
    normal = {t: s for t, s, ty in zip(tokens, scores, types) if ty == 1}
    out = []
    for piece, score in normal.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in normal and b in normal:
                out.append((score, a, b))
    out.sort(key=lambda m: -m[0])  # stable: equal scores keep vocabulary order
    return [(a, b) for _, a, b in out]


def _hf_name(gname: str, path: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gname)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gname)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise QRunError(f"{path}: unexpected GGUF tensor {gname} (not a llama/qwen2 weight qrun knows)")


def export_hf_dir(src, out_dir: str) -> None:
    """Write a Source as a Hugging Face directory transformers can load: config.json, tokenizer files,
    generation_config.json and one bf16 model.safetensors."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)

    def dump(name, obj):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)

    dump("config.json", src.config)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(src.files["tokenizer.json"])
    for name in ("tokenizer_config.json", "generation_config.json"):
        if src.files.get(name) is not None:
            dump(name, src.files[name])
    tensors = {n: src.get(n).contiguous() for n in src.names()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
