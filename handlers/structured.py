"""Structured answers on ``{base}/request/chat``: ``schema``, ``"format": "json"`` and ``choices``.

The fields become the sampler's constraint (``npu.llm.constraints``), so the model cannot write
anything else; the reply keeps the text in ``data.text`` (and the plain-text copy) and adds the
parsed object as ``data.json``. An answer that ran out of ``max_tokens`` before the schema was
complete has ``finish_reason: "length"``, ``data.json: null`` and ``data.incomplete`` saying so:
a truncated object is never handed on as valid.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from handlers.context import HandlerError
from handlers.payloads import ChatPayload
from npu.engine.api import ChatResult
from npu.llm.constraints import Constraint, ConstraintError, json_object, json_schema, one_of
from npu.llm.params import GenerationParams


def constraint_of(req: ChatPayload) -> Constraint | None:
    """The payload's constraint; a bad schema or list is a ``bad_request`` naming the field."""
    given = [name for name, value in (("schema", req.json_schema), ("format", req.format),
                                      ("choices", req.choices)) if value is not None]
    if len(given) > 1:
        raise HandlerError("bad_request",
                           f"give one of schema, format and choices, not {' and '.join(given)}")
    try:
        if req.json_schema is not None:
            return json_schema(req.json_schema, field="schema")
        if req.format is not None:
            return json_object(field="format")
        if req.choices is not None:
            return one_of(req.choices, field="choices")
    except ConstraintError as exc:
        raise HandlerError("bad_request", str(exc)) from exc
    return None


def with_constraint(params: GenerationParams, req: ChatPayload) -> GenerationParams:
    constraint = constraint_of(req)
    return params if constraint is None else dataclasses.replace(params, constraint=constraint)


def is_json_request(req: ChatPayload) -> bool:
    return req.json_schema is not None or req.format is not None


def structured_data(result: ChatResult, json_answer: bool) -> dict[str, Any]:
    """``json`` (the parsed object, or None) and ``incomplete`` for a JSON answer; nothing else."""
    if not json_answer:
        return {}
    if result.complete:
        try:
            return {"json": json.loads(result.text)}
        except json.JSONDecodeError:  # cannot happen under the grammar; never pass it on as JSON
            pass
    reason = ("max_tokens ran out before the JSON was complete; raise max_tokens"
              if result.finish_reason == "length" else "a stop string cut the JSON short")
    return {"json": None, "incomplete": reason}
