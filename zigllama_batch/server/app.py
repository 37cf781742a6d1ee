"""The OpenAI-compatible ASGI app: HTTP in, BatchRequests to the processor, OpenAI JSON out.

Inside: :func:`create_app`. Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``
(both also as server-sent events with ``stream: true``), ``GET /v1/models`` and
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` and the web page at ``GET /``. The app is a thin layer: batching, cancellation and limits live in the
processor; here requests are parsed and validated, errors are shaped as OpenAI's
``{"error": {"message", "type", "param", "code"}}``, and a client that goes away cancels its
request (streamed or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..batching.lifecycle import ProcessorState
from ..batching.types import BatchRequest, BatchResult, StreamChunk
from ..engine.tokenizer import Tokenizer
from ..errors import (
    ConstraintFailed,
    InvalidRequest,
    ProcessorStopped,
    PromptTooLong,
    QueueFull,
    RequestTimeout,
    ZigllamaBatchError,
)
from ..generation import FinishReason
from .backend import Backend, ChunkStream
from .metrics import CONTENT_TYPE_LATEST, ProcessorMetrics
from .schema import ChatCompletionRequest, CompletionRequest, generation_config
from .tools import (
    TaggedCallStream,
    ToolCallDeltas,
    ToolPlan,
    complete,
    tagged_calls,
    tool_calls,
    with_tools,
)
from .web import PAGE_PATHS, page_routes

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

DEFAULT_MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (1 MiB: far more than any prompt the context can hold)."""

_TAKEN = "zigllama_taken"
"""Key in the ASGI scope's ``state``: the processor took the request and counts its outcome."""


class _JSON(JSONResponse):
    """JSON as UTF-8, or with ASCII escapes when the content holds a lone surrogate (which
    UTF-8 cannot encode): a client's own bad input echoed back never becomes a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})

    def body(self) -> dict[str, Any]:
        """OpenAI's error body, as a response or a stream's last event carries it."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        return _JSON(self.body(), status_code=self.status, headers=self.headers)


def create_app(
    processor: Backend,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    manage_processor: bool = False,
    drain_timeout: float | None = 30.0,
) -> Starlette:
    """Build the OpenAI-compatible app around a processor.

    Args:
        processor: the processor requests go to (or any :class:`~zigllama_batch.server.backend.Backend`). Mounted into an existing service, the caller
            starts and closes it; with ``manage_processor`` the app's lifespan does.
        model_name: the id clients pass as ``model`` (default: the model's name).
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        max_body_bytes: larger request bodies get 413.
        manage_processor: start the processor on startup and drain it on shutdown.
        drain_timeout: with ``manage_processor``, seconds a shutdown drain may take before the
            rest is stopped.
    """
    name = model_name or processor.model_name
    metrics = ProcessorMetrics(processor)
    api = _Api(processor, name, max_body_bytes, metrics)
    processor.stats_recorder.observers.append(metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_processor:
            await processor.start()
        try:
            yield
        finally:
            if manage_processor:
                await processor.aclose(drain=True, drain_timeout=drain_timeout)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # Starlette's 405 carries the Allow header (RFC 9110 requires it): keep its headers.
        return ApiError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        # A bug: the client still gets OpenAI's error body; Starlette logs the traceback.
        return ApiError(
            500, f"internal server error: {type(exc).__name__}", type="server_error"
        ).response()

    app = Starlette(
        routes=[
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/v1/models/{model:path}", api.model, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *page_routes(),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)
    app.add_middleware(_CountOutcomes, metrics=metrics)  # outermost: it sees the 401s too
    app.state.processor = processor
    app.state.metrics = metrics
    return app


_OPEN_PATHS = frozenset({"/health", "/metrics", *PAGE_PATHS})
"""Paths that need no API key and are not API requests (probes, scrapes, the web page)."""


class _BearerAuth:
    """Requires ``Authorization: Bearer <key>`` on every path but the open ones (``_OPEN_PATHS``)
    (paths taken relative to where the app is mounted). The scheme is case-insensitive (RFC
    9110); a request with more than one ``Authorization`` header is refused, so a proxy that
    checked one of them cannot disagree with the server about which."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _route_path(scope) not in _OPEN_PATHS:
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


class _CountOutcomes:
    """Counts every API request (all paths but ``_OPEN_PATHS``) in exactly one
    outcome of ``zigllama_requests_total``. A request the processor took (the handler marks
    it in ``scope["state"]``) is counted by the processor when it ends; any other is counted
    here by its status: 401 ``unauthorized``, other 4xx ``invalid`` (499, a client gone before
    its body arrived, ``cancelled``), 5xx or an exception ``error``. A successful model listing
    is not a generation request and is not counted."""

    def __init__(self, app: ASGIApp, metrics: ProcessorMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in _OPEN_PATHS:
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


def _route_path(scope: Scope) -> str:
    """The request path below the app's mount point (ASGI: ``path`` includes ``root_path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


class _EventStream(StreamingResponse):
    """Server-sent events that stop (closing the generator) as soon as the client disconnects,
    whichever ASGI version the server speaks."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream_task = asyncio.ensure_future(self.stream_response(send))
        disconnect_task = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait([stream_task, disconnect_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream_task, disconnect_task):
                task.cancel()
            await asyncio.gather(stream_task, disconnect_task, return_exceptions=True)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if stream_task.done() and not stream_task.cancelled() and stream_task.exception():
            raise stream_task.exception()  # type: ignore[misc]


class _Api:
    """The endpoint handlers."""

    def __init__(
        self,
        processor: Backend,
        model_name: str,
        max_body_bytes: int,
        metrics: ProcessorMetrics,
    ) -> None:
        self.processor = processor
        self.metrics = metrics
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    @property
    def tokenizer(self) -> Tokenizer:
        return self.processor.tokenizer

    # -- endpoints -----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return _JSON({"object": "list", "data": [self._model_object()]})

    async def model(self, request: Request) -> Response:
        wanted = request.path_params["model"]
        if wanted != self.model_name:
            return self._not_served(wanted, param=None).response()
        return _JSON(self._model_object())

    def _model_object(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "zigllama_batch",
            "max_model_len": self.processor.max_context,
        }

    def _not_served(self, model: str, *, param: str | None) -> ApiError:
        return ApiError(
            404,
            f"model {model!r} is not served here; this server serves {self.model_name!r}",
            type="not_found_error",
            param=param,
            code="model_not_found",
        )

    async def health(self, request: Request) -> Response:
        state = self.processor.state
        ok = state is ProcessorState.RUNNING
        body: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "state": state.value,
            "queue_depth": self.processor.queue_depth,
            "running": self.processor.running,
        }
        if self.processor.failure is not None:
            body["error"] = f"internal error: {self.processor.failure!r}"
        return _JSON(body, status_code=200 if ok else 503)

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, CompletionRequest, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, ChatCompletionRequest, chat=True)

    # -- the shared path -----------------------------------------------------------------------

    async def _handle(self, request: Request, schema: type[Any], *, chat: bool) -> Response:
        constraint: str | None = None  # the field that constrains the output, if one does
        try:
            body = await self._parse(request, schema)
            if body.model != self.model_name:
                raise self._not_served(body.model, param="model")
            calls_in_tags = self.processor.tokenizer.calls_tools_in_tags
            plan = body.tool_plan(template_calls=calls_in_tags) if chat else None
            if chat:
                messages = body.message_dicts()
                if plan is not None and plan.via_template:
                    prompt_ids = self.processor.encode_prompt(messages, tools=plan.template_tools())
                else:
                    prompt_ids = self.processor.encode_prompt(
                        messages if plan is None else with_tools(messages, plan)
                    )
            else:
                prompt_ids = self.processor.encode_prompt(body.prompt_value())
            max_context = self.processor.max_context
            room = max_context - len(prompt_ids)
            asked = body.requested_max_tokens()
            if asked is not None and asked > room:
                field = body.max_tokens_field()
                raise ApiError(
                    400,
                    f"this model's context holds {max_context} tokens; the prompt has "
                    f"{len(prompt_ids)} and {asked} more were asked for ({field})",
                    param=field,
                    code="context_length_exceeded",
                )
            config = generation_config(body, max_tokens_default=room)
            if plan is not None and plan.structured is not None:
                config = config.with_(structured=plan.structured)
            if config.structured is not None:  # compiled off the loop, errors named by field
                constraint = _constraint_field(body, plan)
                try:
                    await self.processor.check_structured(config.structured)
                except InvalidRequest as exc:
                    raise ApiError(400, f"{constraint}: {exc}", param=constraint) from exc
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            batch_request = BatchRequest(
                prompt=prompt_ids,
                config=config,
                priority=body.priority,
                id=rid,
                cache_salt=body.cache_salt,
            )
            # From here the processor counts the request's outcome, refusals included.
            request.scope.setdefault("state", {})[_TAKEN] = True
            if body.stream:
                options = body.stream_options
                stream = self.processor.stream(batch_request)
                events = self._events(
                    stream,
                    rid,
                    chat=chat,
                    prompt_tokens=len(prompt_ids),
                    include_usage=bool(options and options.include_usage),
                    continuous_usage=bool(options and options.continuous_usage_stats),
                    tools=plan,
                    constraint=constraint,
                )
                return _EventStream(
                    events,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            result = await self._submit(request, batch_request)
            if result is None:  # the client went away
                return Response(status_code=499)
            return _JSON(self._full_response(result, rid, chat=chat, tools=plan))
        except ClientDisconnect:  # gone before the body arrived: nobody to answer
            return Response(status_code=499)
        except ApiError as exc:
            return exc.response()
        except ZigllamaBatchError as exc:
            return _api_error(exc, chat=chat, constraint=constraint).response()

    async def _parse(self, request: Request, schema: type[Any]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5,000-digit int,
            # arrays nested 100,000 deep
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        # Before pydantic validates a long list item by item on the loop (34,000 messages:
        # ~0.1 s; 250,000 token ids tried against each type of the prompt's union: ~0.8 s).
        self.processor.check_prompt_length(
            data.get("messages" if schema is ChatCompletionRequest else "prompt")
        )
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = _param_name(first["loc"])
            message = f"{param}: {first['msg']}" if param else str(first["msg"])
            raise ApiError(400, message, param=param) from exc

    async def _submit(self, request: Request, batch_request: BatchRequest) -> BatchResult | None:
        """Run a request; cancel it if the client disconnects first (returns None then)."""
        work = asyncio.ensure_future(self.processor.submit(batch_request))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server cancelled this handler: cancel the request
            work.cancel()
            raise
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return None
        return work.result()

    async def _events(
        self,
        stream: ChunkStream,
        rid: str,
        *,
        chat: bool,
        prompt_tokens: int,
        include_usage: bool,
        continuous_usage: bool,
        tools: ToolPlan | None = None,
        constraint: str | None = None,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        calls = ToolCallDeltas(tools) if tools is not None and not tools.auto else None
        tagged = TaggedCallStream(tools) if tools is not None and tools.auto else None
        kind = "chat.completion.chunk" if chat else "text_completion"
        generated = 0  # tokens so far, for continuous usage

        def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            payload: dict[str, Any] = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }
            if continuous_usage and usage is None:
                usage = _usage_of(prompt_tokens, generated)
            if include_usage or continuous_usage:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        try:
            if chat:
                yield event(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            offset = 0  # characters of text sent so far
            async for chunk in stream:
                generated += 1
                if not chunk.text and chunk.finish_reason is None and chunk.logprob is None:
                    continue  # text held back (partial character or possible stop string)
                if tagged is not None:  # "auto": text, then any calls in tags at the end
                    text = tagged.feed(chunk.text)
                    if text:
                        yield event([self._content_choice(text)])
                    if chunk.finish_reason is not None:
                        rest, deltas = tagged.finish()
                        if rest:
                            yield event([self._content_choice(rest)])
                        reason = str(chunk.finish_reason)
                        if deltas:
                            yield event([self._content_choice(None, {"tool_calls": deltas})])
                            reason = _tool_finish(chunk.finish_reason, True)
                        yield event([self._content_choice(None, {}, reason)])
                    continue
                if calls is not None:  # a tool call: its deltas instead of content
                    done = chunk.finish_reason is not None
                    deltas = calls.feed(chunk.text, final=done)
                    if deltas or done:
                        finish = _tool_finish(chunk.finish_reason, calls.whole) if done else None
                        delta = {"tool_calls": deltas} if deltas else {}
                        yield event([
                            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                        ])  # fmt: skip
                    continue
                yield event([self._chunk_choice(chunk, chat=chat, offset=offset)])
                offset += len(chunk.text)
            result = stream.result
            assert result is not None
            if include_usage:
                yield event([], _usage(result))
            yield b"data: [DONE]\n\n"
        except ZigllamaBatchError as exc:  # ended mid-stream: timeout, stop, engine failure
            error = _api_error(exc, chat=chat, constraint=constraint)
            yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            await stream.aclose()  # a disconnected client cancels its request here

    # -- response bodies -----------------------------------------------------------------------

    @staticmethod
    def _content_choice(
        text: str | None, delta: dict[str, Any] | None = None, finish: str | None = None
    ) -> dict[str, Any]:
        """A chat chunk's choice: ``text`` as content, or the given ``delta``."""
        if delta is None:
            delta = {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _chunk_choice(self, chunk: StreamChunk, *, chat: bool, offset: int) -> dict[str, Any]:
        finish = str(chunk.finish_reason) if chunk.finish_reason is not None else None
        logprobs: dict[str, Any] | None = None
        if chat:
            if chunk.logprob is not None:
                logprobs = {
                    "content": [self._chat_logprob(chunk.token_id, chunk.logprob)],
                    "refusal": None,
                }
            delta = {"content": chunk.text} if chunk.text else {}
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if chunk.logprob is not None:
            token = self._token_text(chunk.token_id)
            logprobs = {
                "tokens": [token],
                "token_logprobs": [chunk.logprob],
                "top_logprobs": [{token: chunk.logprob}],
                "text_offset": [offset],
            }
        return {"index": 0, "text": chunk.text, "logprobs": logprobs, "finish_reason": finish}

    def _full_response(
        self, result: BatchResult, rid: str, *, chat: bool, tools: ToolPlan | None = None
    ) -> dict[str, Any]:
        r = result.result
        finish = str(r.finish_reason)
        if chat:
            logprobs = None
            if r.logprobs is not None:
                logprobs = {
                    "content": [
                        self._chat_logprob(t, lp)
                        for t, lp in zip(r.token_ids, r.logprobs, strict=True)
                    ],
                    "refusal": None,
                }
            message: dict[str, Any] = {"role": "assistant", "content": r.text, "refusal": None}
            if tools is not None and tools.auto:
                head, found = tagged_calls(tools, r.text)
                if found:
                    message = {**message, "content": head or None, "tool_calls": found}
                    finish = _tool_finish(r.finish_reason, True)
            elif tools is not None and (calls := tool_calls(tools, r.text)) is not None:
                message = {**message, "content": None, "tool_calls": calls}
                finish = _tool_finish(r.finish_reason, complete(tools, r.text))
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            kind = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": r.text,
                "logprobs": self._completion_logprobs(result),
                "finish_reason": finish,
            }
            kind = "text_completion"
        return {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": _usage(result),
        }

    def _completion_logprobs(self, result: BatchResult) -> dict[str, Any] | None:
        r = result.result
        if r.logprobs is None:
            return None
        tokens = [self._token_text(t) for t in r.token_ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": list(r.logprobs),
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, r.logprobs, strict=True)],
            "text_offset": offsets,
        }

    def _chat_logprob(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token_id)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(raw),
            "top_logprobs": [],
        }

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _usage(result: BatchResult) -> dict[str, Any]:
    r = result.result
    usage: dict[str, Any] = _usage_of(r.prompt_tokens, r.completion_tokens)
    usage["prompt_tokens_details"] = {"cached_tokens": r.cached_tokens}
    return usage


def _usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _tool_finish(reason: FinishReason | None, whole: bool) -> str:
    """OpenAI's finish reason of a tool-call answer: ``tool_calls`` when the call is whole
    (a stop string or stop token may have cut it short: then ``stop``)."""
    return "tool_calls" if reason == FinishReason.STOP and whole else str(reason)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _constraint_field(body: Any, plan: ToolPlan | None) -> str | None:
    """The request field whose constraint the output follows: the named function's parameters
    of a tool call (``tools`` when any tool may be called), else the field that asked."""
    if plan is not None:
        names = [t.function.name if t.function else None for t in body.tools or ()]
        if plan.named is not None and plan.named in names:
            return f"tools[{names.index(plan.named)}].function.parameters"
        return "tools"
    asked = body.structured()
    return str(asked[0]) if asked else None


def _api_error(exc: ZigllamaBatchError, *, chat: bool, constraint: str | None = None) -> ApiError:
    """The HTTP form of a library error (``constraint``: the field that constrained the output,
    named by a ConstraintFailed)."""
    if isinstance(exc, ConstraintFailed):  # the client's constraint, found unusable late
        return ApiError(
            400,
            f"{constraint}: {exc}" if constraint else str(exc),
            param=constraint,
            code="constraint_failed",
        )
    if isinstance(exc, PromptTooLong):
        return ApiError(
            400, str(exc), param="messages" if chat else "prompt", code="context_length_exceeded"
        )
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


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _param_name(loc: tuple[int | str, ...]) -> str | None:
    """A pydantic error location as OpenAI names a parameter: ``messages[0].role`` (union
    branch tags such as ``str`` or ``list[str]`` left out)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            name += f".{part}" if name else part
    return name or None


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected."""
    receive: Callable[[], Awaitable[Mapping[str, Any]]] = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
