"""Generation: prefill, then one static-shape decode step per token; text streamed as it forms.

    llm = qrun.load("model.stcmp")
    llm.generate("The capital of France is", max_new_tokens=20, temperature=0)
    for piece in llm.stream("Hello", chat=True): ...
    llm.generate(messages=[{"role": "user", "content": "Hi"}])

`prefill` and `decode_one` are plain functions of the model; `LLM.decode_step` is the hook a faster runtime
(a captured CUDA graph) replaces: it maps (token (B, 1), input_pos (1,)) to logits (B, V) float32 with fixed
shapes. `LLM.greedy_step`, where the runtime has one, also picks the argmax and advances on the device, so
greedy decoding runs ahead of the host (`run_ahead`). Everything here yields; printing and formatting live in
the CLI.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch

from qrun.errors import QRunError
from qrun.runtime.sampling import SamplingParams, greedy, sample
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
    # The remaining steps: time spent outside the consumer of the stream; on the run-ahead path the wall time
    # from the first token to the last, since there the device computes while the consumer runs.
    decode_s: float = 0.0
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


class PendingIds(Protocol):
    def ids(self) -> list[int]: ...  # waits for the token ids (B,) of one step and returns them


class GreedyStep(Protocol):
    """A decode step that picks the argmax and advances on the device, keeping its token and position there
    (qrun.runtime.cuda_graph.GraphedDecodeStep). Each call only enqueues work; .ids() on the result waits."""

    def start(self, token: torch.Tensor, pos: int) -> PendingIds:
        """Load token (B,) long at cache position pos as the current one; returns its read."""

    def advance(self) -> PendingIds:
        """One step: current token at current position -> argmax becomes current, position + 1; returns the
        new token's read."""


def run_ahead(step: GreedyStep, first: torch.Tensor, pos: int, n_tokens: int,
              stop: Callable[[list[int]], bool] | None = None) -> Iterator[list[int]]:
    """Greedy decoding with the host one step behind the device. first (B,) long: the token the prefill gave,
    at cache position pos. Yields lists of B ids: first's, then one per device step, n_tokens in all, or fewer
    when stop(ids) holds for one: that list is still yielded (the caller decides whether to keep it), and
    nothing more.

    Step k (k >= 1) feeds token k at position pos + k - 1 and produces token k + 1. It is enqueued before
    token k is read, and step k + 1 right after token k has been read and checked, before it is handed out:
    while the host waits for token k the device runs step k, and while the consumer handles token k it has
    steps k and k + 1 queued, so the host's per-token work hides behind the device's. Which steps are needed
    at most does not depend on the tokens (step k only if k < n_tokens), so no step runs past that: the last
    one runs at position pos + n_tokens - 2, and the caller bounds n_tokens by the KV cache. Only a stop that
    depends on a token is seen one step late: step k has already run when token k stops the loop, and its
    token is never read.
    """
    if n_tokens < 1:
        return
    pending = deque([step.start(first, pos)])
    if n_tokens > 1:
        pending.append(step.advance())  # step 1
    for k in range(1, n_tokens + 1):
        ids = pending.popleft().ids()  # token k; step k is already queued behind it
        halt = stop is not None and stop(ids)
        if not halt and k + 1 < n_tokens:
            pending.append(step.advance())  # step k + 1, producing token k + 2
        yield ids
        if halt:
            return


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
        # The run-ahead step for argmax-only sampling (see GreedyStep), or None: the loop below, which reads
        # every token on the host before it starts the next step.
        self.greedy_step: GreedyStep | None = None
        self.stats = GenerationStats()

    def accelerate(self, graph: bool = True) -> "LLM":
        """On CUDA, replay the decode step as one captured CUDA graph (captured on first use, per batch size);
        the same graph picks greedy tokens on the device, so greedy decoding runs ahead of the host.
        No-op on the CPU."""
        if self.device.type != "cuda" or not graph:
            return self
        from qrun.runtime.cuda_graph import GraphedDecodeStep
        self.decode_step = GraphedDecodeStep(self.decode_step)  # the static-shape CUDA step set above
        self.greedy_step = self.decode_step
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
        if self.greedy_step is not None and params.argmax_only:
            yield from self._generate_run_ahead(greedy(logits), n, params, t0)
            return
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

    def _generate_run_ahead(self, first: torch.Tensor, n: int, params: SamplingParams,
                            t0: float) -> Iterator[int]:
        """generate_ids for argmax-only sampling through self.greedy_step: the same ids, stats and finish
        reasons as the loop above. first (1,): the prefill's token, at position n.

        The k-th generated token sits at position n + k - 1, so at most min(max_new_tokens, max_seq_len - n)
        tokens: run_ahead then runs no step past position max_seq_len - 2, as the loop above.
        The step run_ahead enqueues past an EOS token (at the EOS token's position p <= max_seq_len - 2)
        changes no result. It writes the K/V cache row p, the device token and the device position. Attention
        only ever reads cache rows at or before the reading token's own position (Transformer.forward's mask
        keys <= pos and kv_len > max(input_pos); decode_attention reads [0, input_pos]), and within one
        generation every such row is written before it is read: the prefill writes [0, n') (each chunk before
        it attends), each decode step its own row. So row p is overwritten by whichever later generation
        reaches p, before it reads it, or never attended to. The token and position are reloaded by the next
        start() (or copied in by a plain decode_step call).
        """
        st = self.stats
        eos = self.eos_ids
        n_tokens = min(params.max_new_tokens, self.max_seq_len - n)
        t1 = None
        for ids in run_ahead(self.greedy_step, first, n, n_tokens, stop=lambda ids: ids[0] in eos):
            now = time.perf_counter()
            if t1 is None:
                st.prefill_s, t1 = now - t0, now
            else:
                st.decode_s = now - t1
            if ids[0] in eos:
                st.finish_reason = "eos"
                return
            st.generated_tokens += 1
            yield ids[0]
        st.finish_reason = "length" if st.generated_tokens >= params.max_new_tokens else "max_seq_len"

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
