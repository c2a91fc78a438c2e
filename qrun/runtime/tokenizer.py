"""Tokenizer, chat template and streaming detokenization, from the files a .stcmp header carries.

The tokenizer is the `tokenizers` library built from the stored tokenizer.json. The chat template is rendered
the way transformers renders it (sandboxed jinja2, trim_blocks/lstrip_blocks, raise_exception, tojson,
strftime_now, the special tokens of tokenizer_config.json as variables) and its output is tokenized without
adding special tokens, since the template writes them itself.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable

from qrun.errors import QRunError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(v: Any) -> str | None:
    """tokenizer_config values are a string or a serialized AddedToken {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


@lru_cache(maxsize=8)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise QRunError(f"the model's chat template does not parse: {e}") from None


class Tokenizer:
    def __init__(self, files: dict[str, Any], source: str = "model"):
        from tokenizers import Tokenizer as _Tok

        raw = files.get("tokenizer.json") if files else None
        if not raw:
            raise QRunError(f"{source}: the file holds no tokenizer (tokenizer.json); convert it again from a "
                            "checkpoint directory that has one")
        try:
            self.tok = _Tok.from_str(raw if isinstance(raw, str) else json.dumps(raw))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise QRunError(f"{source}: the stored tokenizer.json cannot be read ({e})") from None
        self.config: dict[str, Any] = files.get("tokenizer_config.json") or {}
        self.special_tokens = {k: _token_str(self.config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        template = files.get("chat_template") or self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str | None = template or None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) to the prompt text the model was tuned on."""
        import jinja2
        if not self.chat_template:
            raise QRunError("this model has no chat template; use a plain prompt (without --chat)")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise QRunError("chat messages must be dicts with 'role' and 'content'")
        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self.special_tokens, **kwargs)
        except jinja2.exceptions.TemplateError as e:
            raise QRunError(f"the chat template refused these messages: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


class StreamDecoder:
    """Token ids in, text pieces out, never splitting a UTF-8 character.

    Decodes a short window of tokens (a few before the last emitted one, for context: SentencePiece drops
    the leading space of a word at the start of a decode) and emits only what the window added. Text ending
    in U+FFFD is an incomplete byte sequence, so it is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)[-6:]  # context tokens (e.g. the prompt's tail), never emitted
        self.prefix = max(len(self.ids) - 5, 0)
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """What is still held back when generation ends (an incomplete character decodes as U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and (final or not text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text):]
        return ""
