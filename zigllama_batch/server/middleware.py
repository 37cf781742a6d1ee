"""The app's ASGI middleware: API key, outcome counting and CORS.

Inside: :func:`add_middleware` (stacks them in the one order that works), :class:`BearerAuth`
(``Authorization: Bearer <key>``), :class:`CountOutcomes` (every API request in exactly one
outcome of ``zigllama_requests_total``) and :func:`mark_taken` (a handler saying the processor
took the request and will count it). CORS is Starlette's own ``CORSMiddleware``, outermost, so a
browser's preflight ``OPTIONS`` is answered before the key is asked for and is not counted as a
request, and every answer (a 401 too) carries the CORS headers a browser needs to read it.

Paths are taken relative to where the app is mounted; ``/health`` and ``/metrics`` (probes and
scrapes) and the web page's files are open and not counted.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError
from .metrics import ProcessorMetrics
from .web import PAGE_PATHS

__all__ = ["OPEN_PATHS", "BearerAuth", "CountOutcomes", "add_middleware", "mark_taken"]

OPEN_PATHS = frozenset({"/health", "/metrics", *PAGE_PATHS})
"""Paths that need no API key and are not API requests (probes, scrapes, the web page)."""

_TAKEN = "zigllama_taken"
"""Key in the ASGI scope's ``state``: the processor took the request and counts its outcome."""


def add_middleware(
    app: Starlette,
    *,
    metrics: ProcessorMetrics,
    api_key: str | None,
    cors_origins: Sequence[str] | None,
) -> None:
    """Wrap ``app``: CORS (when origins are given) outside outcome counting, outside the key."""
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(CountOutcomes, metrics=metrics)  # outside the key: it sees the 401s too
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],  # Authorization and the OpenAI clients' X-Stainless-* headers
            expose_headers=["Retry-After"],
            max_age=600,
        )


def mark_taken(request: Request) -> None:
    """From now on the processor counts this request's outcome (refusals included)."""
    request.scope.setdefault("state", {})[_TAKEN] = True


class BearerAuth:
    """Requires ``Authorization: Bearer <key>`` on every path but the open ones. The scheme is
    case-insensitive (RFC 9110); a request with more than one ``Authorization`` header is
    refused, so a proxy that checked one of them cannot disagree with the server about which."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope) not in OPEN_PATHS:
            error = self._check([v for k, v in scope["headers"] if k.lower() == b"authorization"])
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, given: list[bytes]) -> ApiError | None:
        if len(given) > 1:
            return ApiError(
                400,
                f"{len(given)} Authorization headers; send exactly one",
                param="Authorization",
                code="duplicate_authorization_header",
            )
        scheme, _, token = given[0].strip().partition(b" ") if given else (b"", b"", b"")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
            return ApiError(
                401,
                "invalid or missing API key (Authorization: Bearer ...)",
                type="authentication_error",
                code="invalid_api_key",
            )
        return None


class CountOutcomes:
    """Counts every API request in exactly one outcome of ``zigllama_requests_total``. A
    request the processor took (see :func:`mark_taken`) is counted by the processor when it
    ends; any other is counted here by its status: 401 ``unauthorized``, other 4xx ``invalid``
    (499, a client gone before its body arrived, ``cancelled``), 5xx or an exception ``error``.
    A successful listing or tokenization is not a generation request and is not counted."""

    def __init__(self, app: ASGIApp, metrics: ProcessorMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before it starts a response

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if not scope.get("state", {}).get(_TAKEN, False):
                self.metrics.on_http_outcome(status)


def route_path(scope: Scope) -> str:
    """The request path below the app's mount point (ASGI: ``path`` includes ``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path
