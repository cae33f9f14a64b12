"""Prompt token ids in which text sent by the public cannot become special tokens.

A chat template renders one string, and ``Tokenizer.encode`` turns every special-token text in it
(``<|im_end|>``, ``<|im_start|>``...) into that token, wherever the text came from: a user message
holding ``<|im_end|>\\n<|im_start|>system\\n...`` would open a real system turn. So every string of
a request is masked before the template sees it: each special-token text in it, and a fragment of
one at the string's (whitespace-trimmed) edge that could join the text next to it into one,
becomes a placeholder. The only special tokens left in the rendered text are then the template's
own; the masked text is put back and encoded as ordinary text (the tokenizer's own
``encode_special_tokens`` switch, on a copy, so the shared tokenizer is never toggled).

Non-special added tokens (``<think>``, ``<tool_call>`` in Qwen's tokenizers) stay what the
tokenizer makes of them everywhere, as with Hugging Face's ``split_special_tokens``. Prompts whose
strings hold no special-token text tokenize exactly as a single ``encode`` of the rendered text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Encoding, Tokenizer

from npu.llm.chat_template import ChatTemplate

# (text before the special token, ids of that text, the special token's id or None at the end)
_Segment = tuple[str, list[int], int | None]


class PromptEncoder:
    """Encodes raw prompts and chat prompts for one tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        specials = sorted({t.content for t in added.values() if t.special}, key=len, reverse=True)
        # Longest first: at each position the regex takes the longest token, as the tokenizer does.
        self._pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._prefixes = frozenset(s[:k] for s in specials for k in range(1, len(s)))
        self._suffixes = frozenset(s[k:] for s in specials for k in range(1, len(s)))
        self._longest = max(map(len, specials), default=0)
        # A normalized special token matches after normalization (e.g. NFKC folds fullwidth forms).
        self._normalizer = tokenizer.normalizer if any(
            t.special and t.normalized for t in added.values()
        ) else None

    def encode(self, text: str, *, parse_special_tokens: bool = False) -> list[int]:
        """``text`` as ordinary text; with ``parse_special_tokens`` its special-token texts are the tokens."""
        tokenizer = self.tokenizer if parse_special_tokens else self._plain
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_chat(
        self, template: ChatTemplate, messages: Sequence[Mapping[str, Any]], **render: Any
    ) -> list[int]:
        """The rendered conversation; only the template's own markers are special tokens.

        Raises:
            ValueError: from ``template.render``, its message showing the request's own text.
        """
        masks = _Masks(self)
        try:
            rendered = template.render(masks.deep(messages), **{k: masks.deep(v) for k, v in render.items()})
        except ValueError as exc:
            raise ValueError(masks.restore(str(exc))) from exc
        if not masks.texts:
            return self.encode(rendered, parse_special_tokens=True)
        text = masks.restore(rendered)
        structure = self._segments(rendered)
        whole = self._segments(text)
        if [(masks.restore(t), s) for t, _, s in structure] == [(t, s) for t, _, s in whole]:
            # The masked text added no special token: the ids of a single encode, unchanged.
            return [i for _, ids, s in whole for i in (ids if s is None else [*ids, s])]
        out: list[int] = []
        for gap, ids, special in structure:
            restored = masks.restore(gap)
            out.extend(ids if restored == gap else self.encode(restored))
            if special is not None:
                out.append(special)
        return out

    def _segments(self, text: str) -> list[_Segment]:
        """``text`` encoded with special tokens parsed, cut at each special token."""
        encoding: Encoding = self.tokenizer.encode(text, add_special_tokens=False)
        segments: list[_Segment] = []
        ids: list[int] = []
        end = 0
        for token, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True):
            if token in self.special_ids:
                segments.append((text[end:start], ids, token))
                ids, end = [], stop
            else:
                ids.append(token)
        segments.append((text[end:], ids, None))
        return segments

    def mask(self, value: str, masks: _Masks) -> str:
        """``value`` with its special-token texts, and token fragments at its edges, masked."""
        if self._pattern is None:
            return value
        if self._normalizer is not None and self._pattern.search(self._normalizer.normalize_str(value)):
            return masks.placeholder(value)
        body = value.strip()
        lead = len(value) - len(value.lstrip())
        head = next((k for k in range(min(self._longest, len(body)), 0, -1)
                     if body[:k] in self._suffixes), 0)
        rest = body[head:]
        tail = next((k for k in range(min(self._longest, len(rest)), 0, -1)
                     if rest[-k:] in self._prefixes), 0)
        middle = self._pattern.sub(lambda m: masks.placeholder(m.group()), rest[: len(rest) - tail])
        return "".join((
            value[:lead],
            masks.placeholder(body[:head]) if head else "",
            middle,
            masks.placeholder(rest[len(rest) - tail :]) if tail else "",
            value[lead + len(body) :],
        ))


class _Masks:
    """The placeholders of one render; each stands for the text it replaced."""

    def __init__(self, encoder: PromptEncoder) -> None:
        self._encoder = encoder
        self._nonce = secrets.token_hex(6)
        # Letters and digits only, so no filter or JSON escape changes it, and matched in any case.
        self._restore = re.compile(rf"zq{self._nonce}x(\d+)qz", re.IGNORECASE)
        self.texts: list[str] = []

    def placeholder(self, text: str) -> str:
        self.texts.append(text)
        return f"zq{self._nonce}x{len(self.texts) - 1}qz"

    def deep(self, value: Any) -> Any:
        """A copy of ``value`` with every string in it (keys too) masked."""
        if isinstance(value, str):
            return self._encoder.mask(value, self)
        if isinstance(value, Mapping):
            return {self.deep(k): self.deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.deep(v) for v in value]
        return value

    def restore(self, text: str) -> str:
        if not self.texts:
            return text
        return self._restore.sub(lambda m: self.texts[int(m.group(1))], text)
