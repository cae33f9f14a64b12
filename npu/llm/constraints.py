"""Output that cannot break: a grammar's mask of allowed tokens, applied before sampling.

The sampler runs on the host for the card and the CPU twin alike, so every token can be held to a
grammar: a JSON Schema, any JSON object, or one of a list of strings. The grammar engine is
llguidance (Microsoft's Rust library, the one behind Guidance and llama.cpp's ``%llguidance``),
chosen by measurement (docs/PERFORMANCE.md, ``scripts/bench_constraints``): it compiles a schema
in about a millisecond where xgrammar and outlines-core take tens to hundreds (its automaton is
built lazily as tokens arrive), its mask costs tens of microseconds on a 152k vocabulary, and it
ships one abi3 wheel per platform (aarch64 included) with no PyTorch behind it.

- ``one_of``, ``json_object``, ``json_schema``, ``grammar`` build a :class:`Constraint` and check
  it without a model: a bad schema or an unsupported keyword is a ``ConstraintError`` naming the
  field, raised by the front door before any work is queued.
- :class:`GrammarCache` belongs to one runner (one tokenizer): it builds llguidance's tokenizer
  once and keeps the most recently used compiled grammars (bounded); each generation gets its own
  :class:`TokenMask`, a copy of the compiled grammar that follows the generated tokens.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
from jsonschema import Draft202012Validator, SchemaError
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

MAX_CHOICES = 256
MAX_CHOICE_CHARS = 512
MAX_SCHEMA_CHARS = 65_536
GRAMMAR_CACHE_SIZE = 64
# JSON as ``json.dumps`` writes it: what models saw in training, and no run of blank tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A constraint that cannot be used; ``field`` names the request field it came from."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass(frozen=True)
class Constraint:
    """What an answer must be; ``grammar`` is llguidance's grammar text (also the cache key).

    ``kind`` is ``choices``, ``json`` (any JSON object), ``schema`` or ``grammar`` (tool calls);
    ``json`` and ``schema`` answers are JSON the front doors parse for the client.
    """

    kind: str
    grammar: str

    @property
    def is_json(self) -> bool:
        return self.kind in ("json", "schema")


def _checked(kind: str, grammar: str, field: str) -> Constraint:
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise ConstraintError(problem.strip().splitlines()[0], field)
    return Constraint(kind, grammar)


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal (JSON escapes, which llguidance's Lark reads)."""
    return json.dumps(text, ensure_ascii=False)


def one_of(choices: Sequence[str], *, field: str = "choices") -> Constraint:
    """The answer is exactly one of ``choices`` (the MQTT ``choices`` field; a yes/no judge).

    Raises:
        ConstraintError: no choices, too many, an empty or over-long one, or one that is not a
            string.
    """
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise ConstraintError("must be a non-empty list of strings", field)
    if len(choices) > MAX_CHOICES:
        raise ConstraintError(f"at most {MAX_CHOICES} choices", field)
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise ConstraintError(f"choice {i} must be a non-empty string", field)
        if len(choice) > MAX_CHOICE_CHARS:
            raise ConstraintError(f"choice {i} is longer than {MAX_CHOICE_CHARS} characters", field)
    alternatives = " | ".join(lark_literal(c) for c in dict.fromkeys(choices))
    return _checked("choices", llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n"), field)


def check_schema(schema: Any, field: str) -> dict[str, Any]:
    """``schema`` if it is a JSON Schema object llguidance can enforce, else ``ConstraintError``."""
    if not isinstance(schema, Mapping):
        raise ConstraintError("must be a JSON Schema object", field)
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise ConstraintError(f"the schema is longer than {MAX_SCHEMA_CHARS} characters", field)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ConstraintError(f"not a valid JSON Schema{f' at {where}' if where else ''}: {exc.message}",
                              field) from exc
    return dict(schema)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_ONE = ("items", "additionalProperties", "contains", "then", "else")


def closed_objects(schema: Any) -> Any:
    """``schema`` with every object that declares ``properties`` closed to other keys.

    OpenAI's ``strict: true`` means ``additionalProperties: false`` everywhere, and tool
    arguments are held to it by default (a program that acts on arguments expects no invented
    keys). An object that says ``additionalProperties`` (or ``patternProperties``,
    ``unevaluatedProperties``) keeps what it says; one combined with ``allOf`` is left open,
    since closing it would refuse the properties its other parts declare.
    """
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: closed_objects(v) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(v) for v in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), Mapping):
            out[key] = closed_objects(out[key])
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")
    if isinstance(out.get("properties"), Mapping) and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def json_schema(schema: Any, *, field: str = "schema", strict: bool = False) -> Constraint:
    """The answer is JSON that validates against ``schema``; ``strict`` closes its objects
    (:func:`closed_objects`), as OpenAI's ``strict: true`` does. Without it an object that does
    not say ``additionalProperties`` allows other keys, as JSON Schema says.

    Raises:
        ConstraintError: not a valid JSON Schema, or one using a keyword the mask cannot enforce
            (``not``, ``if``/``then``, ...): the message names it rather than accept what it
            could not guarantee.
    """
    checked = check_schema(schema, field)
    if strict:
        checked = closed_objects(checked)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        checked, overrides=JSON_STYLE  # type: ignore[arg-type]
    )
    return _checked("schema", grammar, field)


def json_object(*, field: str = "format") -> Constraint:
    """The answer is one JSON object, of any shape (OpenAI's ``json_object``, MQTT ``"format": "json"``)."""
    any_object = llguidance.LLMatcher.grammar_from_json_schema(
        {"type": "object"}, overrides=JSON_STYLE  # type: ignore[arg-type]
    )
    return _checked("json", any_object, field)


def grammar(lark: str, *, kind: str = "grammar", field: str = "grammar") -> Constraint:
    """A Lark grammar in llguidance's dialect (``%json {...}`` embeds a schema)."""
    return _checked(kind, llguidance.LLMatcher.grammar_from_lark(lark), field)


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """Set every logit whose bit in ``bitmask`` (32 tokens per int32, low bit first) is 0 to -inf.

    Ids past the mask's end (a model's padded vocabulary) are disallowed too. Writes in place.
    """
    n = min(logits.size, bitmask.size * 32)
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little", count=n).view(bool)
    np.copyto(logits[:n], -np.inf, where=~allowed)
    if logits.size > n:
        logits[n:] = -np.inf
    return logits


class TokenMask:
    """One generation's grammar state: masks the logits, then follows the sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self._bitmask = np.zeros((vocab_size + 31) // 32, np.int32)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids at this point set to -inf (in place)."""
        m = self._matcher
        m.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if m.is_error():
            raise RuntimeError(f"the output grammar failed: {m.get_error()}")
        return apply_bitmask(logits, self._bitmask)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"the output grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def accepting(self) -> bool:
        """The text so far is a complete answer (EOS may follow)."""
        return bool(self._matcher.is_accepting())

    @property
    def finished(self) -> bool:
        """Nothing but the end can follow: the answer is complete."""
        return bool(self._matcher.is_stopped())


class GrammarCache:
    """Compiled grammars for one tokenizer, most recently used kept (at most ``size``).

    llguidance's tokenizer (the byte form of every token, ~0.2 s for 49k tokens, ~0.7 s for 152k)
    is built on first use; after that a new schema costs about a millisecond and a known one a
    copy. Thread-safe: a runner serves one generation at a time, but front doors may warm it.
    """

    def __init__(self, tokenizer: Tokenizer, eos_ids: Iterable[int], size: int = GRAMMAR_CACHE_SIZE) -> None:
        self._json = tokenizer.to_str()
        self._eos = sorted(int(i) for i in eos_ids)
        self._size = size
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._json, eos_token=self._eos or None)
            return self._tokenizer

    def __len__(self) -> int:
        return len(self._compiled)

    def mask(self, constraint: Constraint) -> TokenMask:
        """A fresh grammar state for one generation under ``constraint``."""
        tokenizer = self.tokenizer
        with self._lock:
            compiled = self._compiled.get(constraint.grammar)
            if compiled is not None:
                self._compiled.move_to_end(constraint.grammar)
                self.hits += 1
        if compiled is None:
            compiled = llguidance.LLMatcher(tokenizer, constraint.grammar, log_level=0)
            if compiled.is_error():
                raise ValueError(f"the output grammar does not compile: {compiled.get_error()}")
            with self._lock:
                self.misses += 1
                self._compiled[constraint.grammar] = compiled
                while len(self._compiled) > self._size:
                    self._compiled.popitem(last=False)
        return TokenMask(compiled.deep_copy(), tokenizer.vocab_size)

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes of one token (for logprobs): part of a character stays part."""
        return bytes(self.tokenizer.decode_bytes([int(token)]))
