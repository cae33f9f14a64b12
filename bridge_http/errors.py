"""Every error in the OpenAI envelope ``{"error": {message, type, param, code}}``, 401 and 404 included.

Under ``/sdapi/`` the same errors take AUTOMATIC1111's shape (``{error, detail, body, errors}``),
which its clients print.

The engine's typed errors map to the status codes the ``openai`` client understands: it raises
``BadRequestError`` for 400, ``NotFoundError`` for 404, and retries 503 after ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from npu.engine.api import EngineError, ErrorCode
from npu.validation import describe_errors

logger = logging.getLogger(__name__)

# code -> (HTTP status, OpenAI error type)
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.BUSY: (503, "server_error"),
    ErrorCode.RATE_LIMITED: (429, "rate_limit_error"),  # the openai client waits Retry-After, retries
    ErrorCode.REFUSED: (400, "invalid_request_error"),  # the prompt gate: code "refused"
    ErrorCode.UNAVAILABLE: (503, "server_error"),
    ErrorCode.DEVICE_RESET: (503, "server_error"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
    ErrorCode.EXPIRED: (504, "timeout_error"),
    ErrorCode.CANCELLED: (499, "cancelled"),
    ErrorCode.INTERNAL: (500, "server_error"),
}
_PARAM: dict[ErrorCode, str] = {
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "messages",
    ErrorCode.MODEL_NOT_FOUND: "model",
}
_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
A1111_PREFIX = "/sdapi/"


class OpenAIError(Exception):
    """An error raised by a route, answered in the OpenAI envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type=type, param=param, code=code, extra=extra)
        self.retry_after = retry_after

    @classmethod
    def from_engine(cls, exc: EngineError, *, param: str | None = None) -> OpenAIError:
        status, kind = _STATUS.get(exc.code, (500, "server_error"))
        extra = None
        if exc.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED and exc.details:
            # llama.cpp's names, which several clients read to trim a conversation.
            extra = {"n_prompt_tokens": exc.details["prompt_tokens"], "n_ctx": exc.details["context_length"]}
        retry_after = exc.retry_after
        if retry_after is None and status == 503:
            retry_after = 5
        param = param or exc.details.get("param") or _PARAM.get(exc.code)
        return cls(status, exc.message, type=kind, param=param, code=exc.code.value,
                   retry_after=retry_after, extra=extra)

    def response(self, request: Request | None = None) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        body: dict[str, Any] = self.body
        if request is not None and request.url.path.startswith(A1111_PREFIX):
            error = self.body["error"]
            body = {"error": error["code"] or error["type"], "detail": error["message"], "body": "",
                    "errors": error["message"]}
        return JSONResponse(body, status_code=self.status, headers=headers)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code, **(extra or {})}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line for pydantic's errors, and the first bad field as OpenAI's ``param``."""
    if any(tuple(err.get("loc", ())) == ("body",) and err.get("type") == "missing" for err in errors):
        return "the request has no body: send a JSON object with Content-Type: application/json", None
    body_first = [{**err, "loc": _without_body(tuple(err.get("loc", ())))} for err in errors]
    described = describe_errors(body_first)
    param = next((path for path, _ in described if path), None)
    return "; ".join(line for _, line in described[:5]) or "invalid request", param


def _without_body(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return loc[1:] if loc[:1] == ("body",) else loc


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response(request)

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return OpenAIError.from_engine(exc).response(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return OpenAIError(400, message, param=param, code="invalid_value").response(request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        return OpenAIError(exc.status_code, str(exc.detail), type=kind).response(request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in the HTTP bridge")
        error = OpenAIError(500, f"internal error: {exc}", type="server_error", code="internal")
        return error.response(request)
