"""Every request body is checked before a route parses it: its size first, then that it is JSON.

A route's pydantic model only sees bodies that passed: at most ``http.max_body`` bytes (a 413,
from the ``Content-Length`` header alone when it announces more, else as soon as the bytes read
pass the limit), sent as JSON (``Content-Type: application/json``: a body without one is not
parsed, as FastAPI does, which keeps a browser page from posting to the bridge without a CORS
preflight), and standard JSON that ``npu.json_input`` can use. So a 10 MB body is refused before
anything reads or tokenizes it, and a body that is not JSON gets a sentence instead of a
parser's error position. Refusals are OpenAI error bodies (AUTOMATIC1111's under ``/sdapi/``),
like every other error.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from email.message import Message
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from bridge_http.errors import OpenAIError
from npu.json_input import JsonInputError, decode_utf8, first_invalid, loads

DEFAULT_MAX_BODY = 1024 * 1024  # bytes; http.max_body. A long conversation is a few dozen KB
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
SEND_JSON = "send the body as JSON with Content-Type: application/json"


class BodyGuard:
    """ASGI middleware: bodies over ``max_body`` bytes are a 413, bodies that are not JSON a 400."""

    def __init__(self, app: ASGIApp, max_body: int, uploads: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.uploads = dict(uploads or {})  # path -> its own byte cap; multipart, not JSON

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        declared = request.headers.get("content-length", "")
        upload = self.uploads.get(scope["path"])
        if upload is not None:  # a file upload: its own cap, counted while the route reads it
            if declared.isdigit() and int(declared) > upload:
                await self._refuse(request, receive, send, self._too_large(f"{int(declared)} bytes", upload))
                return
            await self.app(scope, self._counted(request, receive, send, upload), send)
            return
        if declared.isdigit() and int(declared) > self.max_body:
            await self._refuse(request, receive, send, self._too_large(f"{int(declared)} bytes"))
            return
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before it finished sending: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                too_large = self._too_large(f"more than {self.max_body} bytes")
                await self._refuse(request, receive, send, too_large)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = json_problem(body, request.headers.get("content-type"))
        if problem is not None:
            await self._refuse(request, receive, send, problem)
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self, size: str, upload: int | None = None) -> OpenAIError:
        limit = (f"{self.max_body} bytes (http.max_body)" if upload is None
                 else f"{upload} bytes for an upload")
        return OpenAIError(413, f"the request body is {size}; the limit is {limit}", code="request_too_large")

    def _counted(self, request: Request, receive: Receive, send: Send, limit: int) -> Receive:
        """A ``receive`` that stops a chunked upload once it passes ``limit`` bytes, with a 413."""
        size = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:  # FastAPI passes Starlette's HTTPException on; the handlers word it
                raise HTTPException(413, str(self._too_large(f"more than {limit} bytes", limit)))
            return message

        return counted

    @staticmethod
    async def _refuse(request: Request, receive: Receive, send: Send, error: OpenAIError) -> None:
        await error.response(request)(request.scope, receive, send)


def json_problem(body: bytes, content_type: str | None) -> OpenAIError | None:
    """Why ``body`` cannot be a route's JSON object, or None when it can (or is empty)."""
    if not body:
        return None  # the route says which fields it needs
    if content_type is None:
        return OpenAIError(400, f"{SEND_JSON} (this one came without a Content-Type)")
    if not is_json_type(content_type):
        return OpenAIError(400, f"{SEND_JSON} (this one came as {content_type.split(';')[0].strip()})")
    text, bad_byte = decode_utf8(body)
    try:
        obj = loads(text.lstrip("\ufeff"))
    except JsonInputError as exc:
        if bad_byte is not None:
            return OpenAIError(400, f"the request body is not valid UTF-8 (byte {bad_byte})")
        if not exc.syntax:
            return OpenAIError(400, f"the request body cannot be read: {exc}")
        return OpenAIError(400, f"the request body is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return OpenAIError(400, f"the request body must be a JSON object, not {_kind(obj)}")
    found = first_invalid(obj)
    if found is not None:
        path, invalid = found
        return OpenAIError(400, f"{path}: {invalid.problem}", param=path, code="invalid_value")
    return None


def is_json_type(content_type: str) -> bool:
    """``application/json`` or ``application/<x>+json``, parameters aside: what FastAPI parses."""
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application":
        return False
    return subtype == "json" or subtype.endswith("+json")


def _kind(obj: object) -> str:
    if isinstance(obj, list):
        return "an array"
    if isinstance(obj, str):
        return "a string"
    return "true, false or null" if obj is None or isinstance(obj, bool) else "a number"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body read already, then the client's own messages
    (a route that watches for ``http.disconnect`` still sees the client leave)."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
