"""Sampling: small pure functions on logits (B, V) float32, applied in Hugging Face's order
(repetition penalty, temperature, top-k, top-p, min-p). Shapes never depend on the data, and nothing here
syncs with the host, so a sampler can run inside a captured decode step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qrun.errors import QRunError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the prompt or the output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not part of the returned text)

    def validate(self) -> "SamplingParams":
        def bad(msg):
            raise QRunError(msg)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad(f"max_new_tokens must be a non-negative integer, not {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be >= 0 (0 is greedy), not {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 turns it off), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], not {self.top_p}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], not {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, not {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            bad("stop strings must not be empty")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def argmax_only(self) -> bool:
        """The token is the argmax of the logits alone (greedy, no repetition penalty): the device can pick it
        inside a captured decode step, with no per-token state kept on the host."""
        return self.greedy and self.repetition_penalty == 1.0


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool. Seen tokens' logits are divided by penalty if > 0, else multiplied."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one token)."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly ahead of each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    thresh = probs.amax(-1, keepdim=True) * min_p
    return logits.masked_fill(probs < thresh, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> the most likely token ids (B,) long (the first one on ties)."""
    return logits.argmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) long, on the logits' device."""
    logits = logits.float()
    if seen is not None:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return greedy(logits)
    logits = logits / params.temperature
    logits = min_p_filter(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), params.min_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
