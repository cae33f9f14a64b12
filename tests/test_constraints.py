"""Grammar masks on the demo tokenizer: what each constraint lets through, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from npu.llm.constraints import (
    Constraint,
    ConstraintError,
    GrammarCache,
    TokenMask,
    apply_bitmask,
    json_object,
    json_schema,
    one_of,
)
from npu.llm.tools import tool_constraint

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "models" / "smollm2-135m-instruct" / "tokenizer.json"
EOS = 2


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    if not TOKENIZER.is_file():
        pytest.fail(f"{TOKENIZER} is missing: ./scripts/test builds the demo model first")
    return Tokenizer.from_file(str(TOKENIZER))


@pytest.fixture(scope="module")
def cache(tokenizer: Tokenizer) -> GrammarCache:
    return GrammarCache(tokenizer, [EOS])


def walk(mask: TokenMask, tokenizer: Tokenizer, seed: int, steps: int = 80) -> tuple[str, bool]:
    """Decode under the mask with random logits (a model that knows nothing): text, complete."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(steps):
        logits = mask.apply(rng.standard_normal(tokenizer.get_vocab_size()).astype(np.float32))
        token = int(np.argmax(logits))
        if token == EOS:
            break
        mask.advance(token)
        out.append(token)
        if mask.finished:
            break
    return tokenizer.decode(out), mask.accepting


def test_one_of_gives_exactly_one_of_the_strings(cache: GrammarCache, tokenizer: Tokenizer) -> None:
    choices = ["yes", "no", 'say "maybe"', "ünïcode ✓"]
    seen = set()
    for seed in range(12):
        text, complete = walk(cache.mask(one_of(choices)), tokenizer, seed)
        assert complete and text in choices
        seen.add(text)
    assert len(seen) > 1, "random logits reach more than one choice"


def test_a_schema_answer_always_validates(cache: GrammarCache, tokenizer: Tokenizer) -> None:
    from jsonschema import validate

    schema = {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": -3, "maximum": 7},
        "tag": {"enum": ["a", "b"]},
        "xs": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    }, "required": ["n", "tag", "xs"], "additionalProperties": False}
    for seed in range(6):
        text, complete = walk(cache.mask(json_schema(schema)), tokenizer, seed)
        assert complete, text
        validate(json.loads(text), schema)


def test_json_object_is_an_object(cache: GrammarCache, tokenizer: Tokenizer) -> None:
    mask = cache.mask(json_object())
    rng = np.random.default_rng(0)
    logits = mask.apply(rng.standard_normal(tokenizer.get_vocab_size()).astype(np.float32))
    allowed = {tokenizer.decode([int(i)]) for i in np.flatnonzero(np.isfinite(logits))}
    assert allowed and all(t.lstrip().startswith("{") for t in allowed)


@pytest.mark.parametrize(("make", "field", "words"), [
    (lambda: json_schema({"type": "bogus"}), "schema", "not a valid JSON Schema"),
    (lambda: json_schema({"not": {"type": "string"}}), "schema", "not"),
    (lambda: json_schema([1, 2]), "schema", "JSON Schema object"),
    (lambda: json_schema({"type": "string", "format": "shoe-size"}), "schema", "shoe-size"),
    (lambda: one_of([]), "choices", "non-empty list"),
    (lambda: one_of(["yes", ""]), "choices", "choice 1"),
    (lambda: one_of("yes"), "choices", "list of strings"),
])
def test_bad_constraints_name_the_field(make, field: str, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConstraintError) as caught:
        make()
    assert caught.value.field == field and words in str(caught.value)


def test_compiled_grammars_are_cached_and_bounded(tokenizer: Tokenizer) -> None:
    cache = GrammarCache(tokenizer, [EOS], size=2)
    for word in ("a", "b", "a", "c", "a"):
        cache.mask(one_of([word]))
    assert len(cache) == 2 and cache.hits == 2 and cache.misses == 3


def test_apply_bitmask_drops_ids_past_the_mask() -> None:
    bits = np.zeros(1, np.int32)
    bits[0] = 0b101
    logits = apply_bitmask(np.zeros(40, np.float32), bits)
    assert np.flatnonzero(np.isfinite(logits)).tolist() == [0, 2]


def allows(cache: GrammarCache, tokenizer: Tokenizer, constraint: Constraint, text: str) -> bool:
    """The constraint lets ``text`` through as a whole answer."""
    mask = cache.mask(constraint)
    try:
        for token in tokenizer.encode(text, add_special_tokens=False).ids:
            mask.advance(token)
    except RuntimeError:
        return False
    return mask.accepting


ROOM = {"type": "object", "properties": {"room": {"type": "string"}}}
LIGHT = {"type": "object",
         "properties": {"id": {"type": "integer"}, "on": {"type": "boolean"}, "where": ROOM},
         "required": ["id", "on"]}
TOOL = {"type": "function", "function": {"name": "set_light", "parameters": LIGHT}}


def call(arguments: dict[str, object]) -> str:
    return f'<tool_call>\n{json.dumps({"name": "set_light", "arguments": arguments})}\n</tool_call>'


def test_tool_arguments_hold_no_keys_the_schema_does_not_declare(
    cache: GrammarCache, tokenizer: Tokenizer
) -> None:
    tools = tool_constraint([TOOL], "required", False)
    assert allows(cache, tokenizer, tools, call({"id": 3, "on": True, "where": {"room": "hall"}}))
    assert not allows(cache, tokenizer, tools, call({"id": 3, "on": True, "required": ["id", "on"]}))
    assert not allows(cache, tokenizer, tools, call({"id": 3, "on": True, "where": {"room": "a", "x": 1}}))
    # A schema that opens its objects keeps them open.
    open_tool = {"type": "function", "function": {"name": "set_light",
                                                  "parameters": {**LIGHT, "additionalProperties": True}}}
    assert allows(cache, tokenizer, tool_constraint([open_tool], "required", False),
                  call({"id": 3, "on": True, "extra": 1}))


def test_strict_json_schema_closes_objects_and_plain_keeps_json_schemas_rules(
    cache: GrammarCache, tokenizer: Tokenizer
) -> None:
    extra = json.dumps({"id": 3, "on": True, "colour": "red"})
    assert allows(cache, tokenizer, json_schema(LIGHT), extra), "JSON Schema allows other keys"
    assert not allows(cache, tokenizer, json_schema(LIGHT, strict=True), extra)
    nested = json.dumps({"id": 3, "on": True, "where": {"room": "a", "x": 1}})
    assert not allows(cache, tokenizer, json_schema(LIGHT, strict=True), nested)
    assert allows(cache, tokenizer, json_schema(LIGHT, strict=True), json.dumps({"id": 3, "on": False}))


def test_after_a_whole_call_the_answer_may_end_and_one_call_ends_it(
    cache: GrammarCache, tokenizer: Tokenizer
) -> None:
    one = call({"id": 3, "on": True})
    for parallel in (True, False):
        mask = cache.mask(tool_constraint([TOOL], "required", parallel))
        for token in tokenizer.encode(one, add_special_tokens=False).ids:
            mask.advance(token)
        assert mask.accepting, "EOS is allowed after a whole call"
        assert mask.finished is not parallel, "parallel_tool_calls false: nothing may follow the call"
