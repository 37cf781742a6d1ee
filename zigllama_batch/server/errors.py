"""The HTTP error model: OpenAI's ``{"error": {"message", "type", "param", "code"}}`` and the
status each failure gets.

Inside: :class:`ApiError` (an error answered in OpenAI's shape), :class:`JSON` (a JSON response
that never fails on a client's own bad text), :func:`api_error` (a library exception from
:mod:`zigllama_batch.errors` as an HTTP error), :func:`validation_error` (a pydantic error as a
400 naming the parameter as OpenAI does), and the app's handlers of Starlette's own errors (an
unknown route gets a JSON 404 listing the routes served; a bug gets a 500 in the same shape).

Bad input is always a 4xx that says what is wrong and, where one field is to blame, names it in
``param``; a 5xx means the server failed, never the client.

    ZigllamaBatchError subclass      status  type / code
    ConstraintFailed                 400     invalid_request_error / constraint_failed
    PromptTooLong                    400     invalid_request_error / context_length_exceeded
    InvalidRequest                   400     invalid_request_error
    QueueFull                        429     rate_limit_error / queue_full (Retry-After)
    ProcessorStopped                 503     service_unavailable_error / server_shutting_down
    RequestTimeout                   504     timeout_error / request_timeout
    anything else                    500     server_error
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import (
    ConstraintFailed,
    InvalidRequest,
    ProcessorStopped,
    PromptTooLong,
    QueueFull,
    RequestTimeout,
    ZigllamaBatchError,
)

__all__ = [
    "JSON",
    "ApiError",
    "api_error",
    "http_error_handler",
    "server_error_handler",
    "too_large",
    "validation_error",
]


class JSON(JSONResponse):
    """JSON as UTF-8, or with ASCII escapes when the content holds a lone surrogate (which
    UTF-8 cannot encode): a client's own bad input echoed back never becomes a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    """An error answered in OpenAI's shape (``extra``: more top-level keys of the body)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """OpenAI's error body, as a response or a stream's last event carries it."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            },
            **self.extra,
        }

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return JSON(self.body(), status_code=self.status, headers=self.headers)


def api_error(
    exc: ZigllamaBatchError, *, prompt_param: str, constraint: str | None = None
) -> ApiError:
    """The HTTP form of a library error.

    Args:
        exc: the error.
        prompt_param: the request field that holds the prompt (named by a PromptTooLong).
        constraint: the field that constrained the output (named by a ConstraintFailed).
    """
    if isinstance(exc, ConstraintFailed):  # the client's constraint, found unusable late
        return ApiError(
            400,
            f"{constraint}: {exc}" if constraint else str(exc),
            param=constraint,
            code="constraint_failed",
        )
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        field, sep, _ = str(exc).partition(":")
        param = field if sep and field.replace("_", "").replace(".", "").isalnum() else None
        return ApiError(400, str(exc), param=param)
    if isinstance(exc, QueueFull):
        retry = max(1, math.ceil(exc.retry_after_s))
        return ApiError(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(exc, ProcessorStopped):
        return ApiError(
            503, str(exc), type="service_unavailable_error", code="server_shutting_down"
        )
    if isinstance(exc, RequestTimeout):
        return ApiError(504, str(exc), type="timeout_error", code="request_timeout")
    return ApiError(500, str(exc), type="server_error")


def too_large(limit: int) -> ApiError:
    """The 413 of a body over ``limit`` bytes."""
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def validation_error(exc: ValidationError) -> ApiError:
    """A pydantic error as a 400 naming its first bad parameter."""
    first = exc.errors()[0]
    param = param_name(first["loc"])
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return ApiError(400, message, param=param)


def param_name(loc: tuple[int | str, ...]) -> str | None:
    """A pydantic error location as OpenAI names a parameter: ``messages[0].role`` (union
    branch tags such as ``str`` or ``list[str]`` left out)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            name += f".{part}" if name else part
    return name or None


def served_routes(routes: list[BaseRoute]) -> list[str]:
    """``METHOD /path`` of every route served (HEAD, implied by GET, left out)."""
    out = []
    for route in routes:
        if isinstance(route, Route):
            methods = sorted((route.methods or {"GET"}) - {"HEAD"})
            out += [f"{method} {route.path_format}" for method in methods]
    return out


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own errors in OpenAI's shape: an unknown route's 404 lists the routes
    served (in the message, and as ``routes``); a 405 keeps its Allow header (RFC 9110)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        routes = served_routes(request.app.routes)
        return ApiError(
            404,
            f"no route {request.method} {request.url.path}; this server serves "
            + ", ".join(routes),
            type="not_found_error",
            code="unknown_route",
            extra={"routes": routes},
        ).response()
    return ApiError(exc.status_code, str(exc.detail), headers=exc.headers).response()


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """A bug: the client still gets OpenAI's error body; Starlette logs the traceback."""
    return ApiError(
        500, f"internal server error: {type(exc).__name__}", type="server_error"
    ).response()
