"""Streaming detokenization: one token id in, text that is safe to show out.

A token is not a unit of text: a byte-level BPE token may hold half of a UTF-8 character (an
emoji is often split over two or three tokens), and decoding tokens one by one would show
U+FFFD where the pieces meet. For byte-level tokenizers (GPT-2 style, used by SmolLM2, Qwen,
Llama 3) each id maps to fixed bytes, so the bytes go through an incremental UTF-8 decoder that
holds back an incomplete character: O(1) per token. Other tokenizers fall back to re-decoding a
short window of pending tokens and holding back text that ends in U+FFFD.

Either way the joined segments equal ``tokenizer.decode(ids)`` (``skip_special_tokens`` by
default): streamed text is the same as the text of a non-streamed answer.
"""

from __future__ import annotations

import codecs
import copy
import json
import logging
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
_T = TypeVar("_T")

# Per-tokenizer tables (the byte table walks the whole vocabulary: ~0.1 s for 49k tokens), so
# a detokenizer per request costs nothing after the first. Keyed weakly: a dropped tokenizer
# takes its tables with it; keyed by vocabulary size too: adding tokens rebuilds them.
_TABLES: weakref.WeakKeyDictionary[Tokenizer, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def _cached(tokenizer: Tokenizer, name: Hashable, build: Callable[[], _T]) -> _T:
    key = (name, tokenizer.get_vocab_size(with_added_tokens=True))
    tables = _TABLES.setdefault(tokenizer, {})
    if key not in tables:
        tables[key] = build()
    return tables[key]


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable character standing for each byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    shifted to U+0100 and up, in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    decoder = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if chr(b) not in decoder:
            decoder[chr(0x100 + shifted)] = b
            shifted += 1
    return decoder


def _decoder_config(tokenizer: Tokenizer) -> dict[str, Any] | None:
    """The tokenizer's ``decoder`` section as in tokenizer.json (None when it has none)."""
    if tokenizer.decoder is None:
        return None
    try:
        return json.loads(tokenizer.decoder.__getstate__())
    except (AttributeError, TypeError, ValueError):  # older bindings: serialise the whole tokenizer
        return json.loads(tokenizer.to_str()).get("decoder")


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """True when decoding is plain GPT-2 byte-level (decoder ``ByteLevel``, alone or wrapped)."""
    config = _decoder_config(tokenizer)
    if config is None:
        return False
    if config.get("type") == "Sequence":
        members = config.get("decoders") or []
        return len(members) == 1 and members[0].get("type") == "ByteLevel"
    return config.get("type") == "ByteLevel"


def _mentions(config: dict[str, Any] | None, decoder_type: str) -> bool:
    if config is None:
        return False
    return config.get("type") == decoder_type or any(
        _mentions(member, decoder_type) for member in config.get("decoders") or []
    )


def _byte_fallback_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of SentencePiece byte tokens (``<0x41>``), which a ByteFallback decoder fuses in runs."""
    return frozenset(
        i
        for token, i in tokenizer.get_vocab(with_added_tokens=False).items()
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">")
    )


def _special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    return frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def _byte_table(tokenizer: Tokenizer, skip_special_tokens: bool) -> list[bytes]:
    """The bytes each id decodes to, mirroring the ``tokenizers`` ByteLevel decoder.

    A token whose characters all belong to the byte alphabet decodes to those bytes; any other
    (an added token such as ``"a b"``) decodes to its own UTF-8. Special tokens decode to nothing
    when skipped; ids without a token decode to nothing, as ``Tokenizer.decode`` does.
    """
    byte_of = _gpt2_byte_decoder()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for i in range(len(table)):
        token = tokenizer.id_to_token(i)
        if token is None or (skip_special_tokens and token in special):
            continue
        try:
            table[i] = bytes(byte_of[c] for c in token)
        except KeyError:
            table[i] = token.encode("utf-8")
    return table


class StreamingDetokenizer:
    """Turns a stream of token ids into text segments that never end inside a character.

    Usage per request: ``add_token(id)`` for every generated id, read ``last_segment`` whenever
    convenient (it returns the text completed since the previous read), and ``finalize()`` at the
    end so a dangling partial character is flushed (as U+FFFD, like ``decode``), then read
    ``last_segment`` once more.

    The byte table is built once per tokenizer object and shared, so creating a detokenizer per
    request is cheap (:meth:`fresh` and :meth:`reset` skip even the lookup).

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        skip_special_tokens: drop special added tokens, like ``decode(..., skip_special_tokens=True)``.
        byte_level: force (True) or refuse (False) the byte-level fast path; ``None`` detects it.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True, byte_level: bool | None = None
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        if byte_level is None:
            byte_level = is_byte_level(tokenizer)
        self._table: list[bytes] | None = None
        if byte_level:
            self._table = _cached(
                tokenizer, ("bytes", skip_special_tokens), lambda: _byte_table(tokenizer, skip_special_tokens)
            )
        # ByteFallback decodes a run of byte tokens as a whole (all U+FFFD if the run is invalid
        # UTF-8), so the fallback waits for the run to end before showing any of it.
        # Skipped special tokens never reach the decoder, so they do not end such a run.
        self._byte_tokens: frozenset[int] = frozenset()
        self._skipped: frozenset[int] = frozenset()
        if not byte_level:
            logger.debug("decoder is not plain ByteLevel: windowed re-decoding fallback")
            if _mentions(_decoder_config(tokenizer), "ByteFallback"):
                self._byte_tokens = _cached(tokenizer, "byte tokens", lambda: _byte_fallback_ids(tokenizer))
                if skip_special_tokens:
                    self._skipped = _cached(tokenizer, "special", lambda: _special_ids(tokenizer))
        self.reset()

    @property
    def byte_level(self) -> bool:
        return self._table is not None

    def reset(self) -> None:
        """Forget the current stream; the token table stays."""
        self.tokens: list[int] = []
        self._chunks: list[str] = []
        self._read = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Fallback state: tokens[_prefix:_pending] are already shown and decode to _prefix_text;
        # tokens[_pending:] are waiting for a complete character.
        self._prefix = 0
        self._pending = 0
        self._prefix_text = ""
        self._in_byte_run = False

    def fresh(self) -> StreamingDetokenizer:
        """A new, empty detokenizer sharing this one's tokenizer and byte table."""
        clone = copy.copy(self)
        clone.reset()
        return clone

    def add_token(self, token: int) -> None:
        """Feed one generated id."""
        self.tokens.append(token)
        if self._table is not None:
            piece = self._table[token] if 0 <= token < len(self._table) else b""
            if piece:
                text = self._utf8.decode(piece)
                if text:
                    self._chunks.append(text)
            return
        if token not in self._skipped:
            self._in_byte_run = token in self._byte_tokens
        self._redecode(final=False)

    def finalize(self) -> None:
        """End of stream: flush whatever is held back (an incomplete character becomes U+FFFD)."""
        if self._table is not None:
            text = self._utf8.decode(b"", final=True)
            if text:
                self._chunks.append(text)
        else:
            self._redecode(final=True)

    @property
    def last_segment(self) -> str:
        """Text completed since the previous read of this property."""
        segment = "".join(self._chunks[self._read :])
        self._read = len(self._chunks)
        return segment

    @property
    def text(self) -> str:
        """All text completed so far (joins every segment: O(length), for tests and logs)."""
        return "".join(self._chunks)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _redecode(self, final: bool) -> None:
        """Re-decode from the tokens of the last shown segment to the end; show what is new.

        Decoders such as Metaspace treat the first token of a decode call differently (they drop
        its leading space), so the window starts at already shown tokens, whose own decoding
        (``_prefix_text``) is cut off the front: the window stays a few tokens long.
        """
        if self._in_byte_run and not final:
            return
        text = self._decode(self.tokens[self._prefix :])
        if len(text) <= len(self._prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return
        self._chunks.append(text[len(self._prefix_text) :])
        self._prefix = self._pending
        self._pending = len(self.tokens)
        self._prefix_text = self._decode(self.tokens[self._prefix : self._pending])
