"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status.

Every failure a client can cause or see is an `ApiError` subclass; `install_error_handlers`
makes FastAPI answer them (and its own validation and routing errors, and anything
unexpected) in OpenAI's shape, so the server keeps serving after each.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client; subclasses fix the status and OpenAI error type."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # keep message, param and code across Ray's pickling
        return (type(self), (self.message, self.param, self.code))


class Unauthorized(ApiError):
    """401: API keys are configured and the request has no valid `Authorization: Bearer <key>`."""

    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class InvalidRequest(ApiError):
    """400: a parameter is missing, malformed or out of range."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """400: prompt plus max_tokens do not fit the model's context."""

    default_code = "context_length_exceeded"


class InvalidMixture(InvalidRequest):
    """400: an explicit mixture names an unknown expert or a non-finite weight."""

    default_code = "invalid_mixture"


class ModelNotFound(ApiError):
    """404: `model` is no route of this server."""

    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class Conflict(ApiError):
    """409: the name is taken (a route of the bundle, a runtime route, or a running job)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(ApiError):
    """413: the request body is over api.max_body_bytes."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class TooManyRequests(ApiError):
    """429: this ingress replica has too many requests in flight."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailable(ApiError):
    """503: the student is not loaded yet, or a deployment's queue is full."""

    status = 503
    type = "service_unavailable_error"
    default_code = "overloaded"


class InternalError(ApiError):
    """500: the server failed (an adapter could not be built, the engine failed)."""

    status = 500
    type = "server_error"


RETRY_STATUSES = (429, 503)
"""Statuses that tell the client to come back later; they always carry `Retry-After`."""


def error_response(error: ApiError, retry_after_s: int = 1) -> JSONResponse:
    """The error's JSON with its status; 429 and 503 also get `Retry-After`, 401 `WWW-Authenticate`."""
    headers = {}
    if error.status in RETRY_STATUSES:
        headers["Retry-After"] = str(max(0, int(retry_after_s)))
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg', ''))}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors]
    return "; ".join(parts) or "Invalid request", param


def install_error_handlers(app: FastAPI, retry_after_s: int = 1) -> None:
    """Answer ApiError, request validation, unknown paths and unexpected errors in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = InvalidRequest if exc.status_code < 500 else InternalError
        error = kind(str(exc.detail))
        error.status = exc.status_code
        return error_response(error, retry_after_s)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return error_response(InternalError(f"internal error: {type(exc).__name__}"))
