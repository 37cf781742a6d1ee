"""The OpenAI-compatible ASGI app: its routes, its middleware and its lifespan.

Inside: :func:`create_app`. Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``
and ``POST /v1/responses`` (all three also as server-sent events with ``stream: true``),
``GET /v1/responses/{id}`` (a stored response), ``GET /v1/models`` and ``GET /v1/models/{id}``,
``POST /tokenize`` and ``POST /detokenize``, ``GET /health``, ``GET /metrics`` and the web page
at ``GET /`` (:mod:`.web`).

The app is a thin layer. Batching, cancellation and limits live in the processor; each endpoint
is an adapter (:mod:`.completions`, :mod:`.chat`, :mod:`.responses`) over one streaming core
(:mod:`.core`); errors are shaped in :mod:`.errors`, and the API key, outcome counting and CORS
are middleware (:mod:`.middleware`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..batching.lifecycle import ProcessorState
from .backend import Backend
from .chat import ChatCompletions
from .completions import Completions
from .core import Adapter, Core
from .errors import JSON, http_error_handler, server_error_handler
from .metrics import CONTENT_TYPE_LATEST, ProcessorMetrics
from .middleware import add_middleware
from .responses import Responses
from .store import DEFAULT_RESPONSE_STORE_SIZE, ResponseStore
from .tokenization import Tokenization
from .web import page_routes

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

DEFAULT_MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (1 MiB: far more than any prompt the context can hold)."""


def create_app(
    processor: Backend,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    manage_processor: bool = False,
    drain_timeout: float | None = 30.0,
    cors_origins: Sequence[str] | None = None,
    response_store_size: int = DEFAULT_RESPONSE_STORE_SIZE,
) -> Starlette:
    """Build the OpenAI-compatible app around a processor.

    Args:
        processor: the processor requests go to (or any
            :class:`~zigllama_batch.server.backend.Backend`). Mounted into an existing service,
            the caller starts and closes it; with ``manage_processor`` the app's lifespan does.
        model_name: the id clients pass as ``model`` (default: the model's name).
        api_key: when set, every path but ``/health`` and ``/metrics`` requires
            ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies get 413.
        manage_processor: start the processor on startup and drain it on shutdown.
        drain_timeout: with ``manage_processor``, seconds a shutdown drain may take before the
            rest is stopped.
        cors_origins: origins a browser may call the API from (``["*"]``: any); None or empty:
            no CORS headers, browsers on other origins are kept out.
        response_store_size: how many ``/v1/responses`` answers are kept for
            ``previous_response_id`` and ``GET /v1/responses/{id}`` (least recently used
            dropped first; 0: none).
    """
    name = model_name or processor.model_name
    metrics = ProcessorMetrics(processor)
    processor.stats_recorder.observers.append(metrics)
    core = Core(processor, name, max_body_bytes)
    info = _Info(core)
    tokenization = Tokenization(core)
    store = ResponseStore(response_store_size)
    responses = Responses(core, store)

    def endpoint(adapter: Adapter) -> Any:
        async def handle(request: Request) -> Response:
            return await core.handle(request, adapter)

        return handle

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_processor:
            await processor.start()
        try:
            yield
        finally:
            if manage_processor:
                await processor.aclose(drain=True, drain_timeout=drain_timeout)

    app = Starlette(
        routes=[
            Route("/v1/completions", endpoint(Completions(core)), methods=["POST"]),
            Route("/v1/chat/completions", endpoint(ChatCompletions(core)), methods=["POST"]),
            Route("/v1/responses", endpoint(responses), methods=["POST"]),
            Route("/v1/responses/{response_id}", responses.retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}", responses.delete, methods=["DELETE"]),
            Route("/v1/models", info.models, methods=["GET"]),
            Route("/v1/models/{model:path}", info.model, methods=["GET"]),
            Route("/tokenize", tokenization.tokenize, methods=["POST"]),
            Route("/detokenize", tokenization.detokenize, methods=["POST"]),
            Route("/health", info.health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *page_routes(),
        ],
        exception_handlers={HTTPException: http_error_handler, Exception: server_error_handler},
        lifespan=lifespan,
    )
    add_middleware(app, metrics=metrics, api_key=api_key, cors_origins=cors_origins)
    app.state.processor = processor
    app.state.metrics = metrics
    app.state.responses = store
    return app


class _Info:
    """The model listing and the health probe."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.created = int(time.time())

    async def models(self, request: Request) -> Response:
        return JSON({"object": "list", "data": [self._model_object()]})

    async def model(self, request: Request) -> Response:
        wanted = request.path_params["model"]
        if wanted != self.core.model_name:
            return self.core.not_served(wanted, param=None).response()
        return JSON(self._model_object())

    def _model_object(self) -> dict[str, Any]:
        return {
            "id": self.core.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "zigllama_batch",
            "max_model_len": self.core.processor.max_context,
        }

    async def health(self, request: Request) -> Response:
        processor = self.core.processor
        state = processor.state
        ok = state is ProcessorState.RUNNING
        body: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "state": state.value,
            "queue_depth": processor.queue_depth,
            "running": processor.running,
        }
        if processor.failure is not None:
            body["error"] = f"internal error: {processor.failure!r}"
        return JSON(body, status_code=200 if ok else 503)
