"""Generation: prefill, then one static-shape decode step per token; text streamed as it forms.

    llm = qrun.load("model.stcmp")
    llm.generate("The capital of France is", max_new_tokens=20, temperature=0)
    for piece in llm.stream("Hello", chat=True): ...
    llm.generate(messages=[{"role": "user", "content": "Hi"}])

`prefill` and `decode_one` are plain functions of the model; `LLM.decode_step` is the hook a faster runtime
(a captured CUDA graph) replaces: it maps (token (B, 1), input_pos (1,)) to logits (B, V) float32 with fixed
shapes. Everything here yields; printing and formatting live in the CLI.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from qrun.errors import QRunError
from qrun.runtime.sampling import SamplingParams, sample
from qrun.runtime.tokenizer import StreamDecoder, Tokenizer


PREFILL_CHUNK = 1024  # tokens per prefill forward: activations stay (B, 1024, D) however long the prompt


@torch.inference_mode()
def prefill(model, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None,
            chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """tokens (B, T) at contiguous positions input_pos (T,) -> logits of the last position (B, V) float32;
    fills the KV cache. Runs in chunks of `chunk` tokens, each attending to the cache the earlier chunks
    wrote, so a long prompt needs no (B, T, D)-sized activation buffer (nor (B, T, T) scores).
    kv_len (host int): attend over cache positions [0, kv_len) only (see Transformer.forward)."""
    t = tokens.shape[1]
    for i in range(0, t, chunk):
        j = min(i + chunk, t)
        kv = None if kv_len is None else kv_len - (t - j)  # the cache filled up to this chunk's end
        logits = model(tokens[:, i:j], input_pos[i:j], last_only=True, kv_len=kv)
    return logits[:, -1].float()


@torch.inference_mode()
def decode_one(model, token: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    """token (B, 1), input_pos (1,) -> logits (B, V) float32. With kv_len None, the same shapes every step
    (what a CUDA graph captures); eager CPU decoding passes kv_len to skip the empty cache tail."""
    return model(token, input_pos, kv_len=kv_len)[:, -1].float()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prompt forward + first token sampled
    decode_s: float = 0.0  # the remaining steps, time spent outside the consumer of the stream
    finish_reason: str = ""  # "eos" | "stop" | "length" | "max_seq_len"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.generated_tokens - 1  # the first token comes out of the prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def _hold_stops(pieces: Iterator[str], stops: list[str], on_stop: Callable[[], None]) -> Iterator[str]:
    """Pass text through, cutting it before the first stop string. Text that could be the start of a stop
    string is held back until the next piece decides it."""
    if not stops:
        yield from pieces
        return
    buf = ""
    for piece in pieces:
        buf += piece
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            if min(hits):
                yield buf[:min(hits)]
            on_stop()
            return
        # Longest tail of buf that is a proper prefix of some stop string: keep it, emit the rest.
        keep = max((n for s in stops for n in range(min(len(s) - 1, len(buf)), 0, -1)
                    if s.startswith(buf[-n:])), default=0)
        if len(buf) > keep:
            yield buf[:len(buf) - keep]
            buf = buf[len(buf) - keep:]
    if buf:
        yield buf


class LLM:
    """A loaded model ready to generate: .model (Transformer), .tokenizer, .config (config.json)."""

    def __init__(self, model, tokenizer: Tokenizer | None, config: dict[str, Any], *, device: torch.device,
                 max_seq_len: int, eos_ids: set[int], header: dict[str, Any] | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device, self.max_seq_len, self.eos_ids = device, max_seq_len, set(eos_ids)
        self.header = header or {}
        # (token (1, 1), input_pos (1,)) -> logits (1, V) float32. On a GPU the static-shape step (replaceable
        # by a captured graph); on the CPU reading the position back is free, so attention skips the cache tail.
        if device.type == "cpu":
            self.decode_step = lambda tok, pos: decode_one(self.model, tok, pos, kv_len=int(pos[-1]) + 1)
        else:
            self.decode_step = lambda tok, pos: decode_one(self.model, tok, pos)
        self.stats = GenerationStats()

    def accelerate(self, graph: bool = True) -> "LLM":
        """On CUDA, replay the decode step as one captured CUDA graph (captured on first use, per batch size).
        No-op on the CPU."""
        if self.device.type != "cuda" or not graph:
            return self
        from qrun.runtime.cuda_graph import GraphedDecodeStep
        self.decode_step = GraphedDecodeStep(self.decode_step)  # the static-shape CUDA step set above
        return self

    # ------------------------------------------------------------------------------------------- input
    def encode(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
               chat: bool = False) -> list[int]:
        """Prompt text, or chat messages (or chat=True on a prompt, as one user message) -> token ids."""
        if self.tokenizer is None:
            raise QRunError("this model file holds no tokenizer (tokenizer.json), so it cannot take text; "
                            "convert it from a checkpoint directory that has one")
        if messages is None and prompt is None:
            raise QRunError("give a prompt or messages")
        if messages is not None or chat:
            if messages is None:
                messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self.tokenizer.encode(prompt)

    # ---------------------------------------------------------------------------------------- tokens
    def generate_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yields generated token ids (EOS excluded); stops on EOS, max_new_tokens or a full KV cache.
        Records self.stats as it goes."""
        params.validate()
        n = len(prompt_ids)
        st = self.stats = GenerationStats(prompt_tokens=n)
        if n == 0:
            raise QRunError("the prompt is empty (no tokens)")
        if n >= self.max_seq_len:
            raise QRunError(f"the prompt is {n} tokens but max_seq_len is {self.max_seq_len}: shorten the "
                            f"prompt or load with a larger max_seq_len (--max-seq-len)")
        if max(prompt_ids) >= self.model.args.vocab_size:
            raise QRunError("the prompt holds token ids outside the model's vocabulary")
        if params.max_new_tokens == 0:
            st.finish_reason = "length"
            return
        dev = self.device
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(params.seed)
        tokens = torch.tensor([prompt_ids], dtype=torch.long, device=dev)  # (1, T)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.model.args.vocab_size, dtype=torch.bool, device=dev)
            seen[0, tokens[0]] = True

        t0 = time.perf_counter()
        logits = prefill(self.model, tokens, torch.arange(n, device=dev), kv_len=n)
        tok = sample(logits, params, seen, gen)  # (1,)
        tid = int(tok.item())  # the one host sync per token: the id is needed for text and stop checks
        st.prefill_s = time.perf_counter() - t0
        pos = torch.tensor([n], dtype=torch.long, device=dev)  # (1,) next write position, kept on device
        while True:
            if tid in self.eos_ids:
                st.finish_reason = "eos"
                return
            st.generated_tokens += 1
            yield tid
            if st.generated_tokens >= params.max_new_tokens:
                st.finish_reason = "length"
                return
            if n + st.generated_tokens >= self.max_seq_len:
                st.finish_reason = "max_seq_len"
                return
            t = time.perf_counter()
            if seen is not None:
                seen[0, tid] = True
            logits = self.decode_step(tok.view(1, 1), pos)
            tok = sample(logits, params, seen, gen)
            tid = int(tok.item())
            pos += 1
            st.decode_s += time.perf_counter() - t

    # ------------------------------------------------------------------------------------------ text
    def stream(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
               chat: bool = False, **sampling: Any) -> Iterator[str]:
        """Yields text pieces as they form. Sampling keywords: see SamplingParams."""
        params = SamplingParams(**sampling).validate()
        ids = self.encode(prompt, messages=messages, chat=chat)
        return self.stream_ids(ids, params)

    def stream_ids(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        dec = StreamDecoder(self.tokenizer, ids)

        def pieces():
            for tid in self.generate_ids(ids, params):
                piece = dec.push(tid)
                if piece:
                    yield piece
            tail = dec.flush()
            if tail:
                yield tail

        def stopped():
            self.stats.finish_reason = "stop"

        it = pieces()
        try:
            yield from _hold_stops(it, params.stop, stopped)
        finally:
            it.close()

    def generate(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
                 chat: bool = False, **sampling: Any) -> str:
        return "".join(self.stream(prompt, messages=messages, chat=chat, **sampling))
