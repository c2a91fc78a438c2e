"""Perplexity of a model on a text: the number the quality table is built from.

    perplexity(llm_or_path, text, ctx=512, max_tokens=None) -> {"perplexity": float, "tokens": int}

The text is tokenized once (no special tokens added), cut to its first `max_tokens` tokens, and split into
non-overlapping windows of `ctx` tokens; each window is one cache-free forward pass from position 0, and
every token after the first of its window is scored. Perplexity = exp(mean negative log-likelihood over all
scored tokens); "tokens" is how many were scored. Non-overlapping windows make it cheap and comparable across
quantizations, at the price of a higher absolute value than a sliding window gives (early tokens of each
window see little context), which is the same for every row of a table.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qrun.errors import QRunError


def read_text(path: str) -> str:
    """A UTF-8 text file's content, or a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise QRunError(f"{path}: no such text file") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise QRunError(f"{path}: not a UTF-8 text file ({type(e).__name__})") from None
    if not text.strip():
        raise QRunError(f"{path}: the text is empty")
    return text


def perplexity(llm_or_path, text: str, ctx: int = 512, max_tokens: int | None = None,
               device: str | torch.device | None = None, batch: int | None = None,
               progress: bool = False) -> dict[str, float | int]:
    """Mean-NLL perplexity of `text` under a loaded LLM (qrun.load) or a .stcmp path, on CPU or GPU."""
    from tqdm import tqdm
    if ctx < 2:
        raise QRunError(f"--ctx must be at least 2, not {ctx}")
    if max_tokens is not None and max_tokens < 2:
        raise QRunError(f"--max-tokens must be at least 2, not {max_tokens}")
    llm = llm_or_path
    if not hasattr(llm, "model"):
        import qrun
        llm = qrun.load(llm_or_path, device=device, max_seq_len=ctx, progress=progress)
    if llm.max_seq_len < ctx:
        raise QRunError(f"--ctx {ctx} is longer than the loaded model's max_seq_len {llm.max_seq_len}")
    model = llm.model
    dev = llm.device
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise QRunError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    windows = [ids[s:s + ctx] for s in range(0, len(ids), ctx)]
    windows = [w for w in windows if len(w) >= 2]  # a 1-token tail predicts nothing
    batch = batch or (8 if dev.type == "cuda" else 1)

    nll, scored = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress, leave=False)
    with torch.inference_mode():
        i = 0
        while i < len(windows):
            # Full windows go in batches; the ragged last window alone (no padding, so no mask tricks).
            group = [windows[i]]
            while len(group) < batch and i + len(group) < len(windows) and \
                    len(windows[i + len(group)]) == len(windows[i]):
                group.append(windows[i + len(group)])
            x = torch.tensor(group, dtype=torch.long, device=dev)  # (b, T)
            logits = model(x)  # (b, T, V); input_pos=None: cache-free, positions 0..T-1
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                   reduction="sum").item()
            scored += x.shape[0] * (x.shape[1] - 1)
            i += len(group)
            bar.update(len(group))
    bar.close()
    return {"perplexity": math.exp(nll / scored), "tokens": scored}
