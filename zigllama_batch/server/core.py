"""The streaming core every endpoint adapter runs on: body in, BatchRequest to the processor,
answer or server-sent events out.

Inside: :class:`Core` (reads and bounds the body, validates it, hands it to an adapter, submits
what the adapter prepared, and answers with its rendering), :class:`Turn` (one prepared request:
what to run and how to render it), the :class:`Adapter` protocol, :class:`Event` (one server-sent
event), :class:`Usage`, :class:`EventStream` and :func:`token_logprob` (a generated token's
logprob as chat completions and responses render it).

What every endpoint gets from here, the same way:

- a body over ``max_body_bytes`` is a 413, bad JSON or a non-object a 400, a prompt certainly
  too long a 400 before pydantic walks it item by item, a failed validation a 400 naming the
  parameter, another model's id a 404;
- a client that disconnects cancels its request, streamed (closing the stream frees the slot at
  once) or not (the submission is cancelled; nobody gets an answer);
- a library error is answered in OpenAI's shape with its status (:func:`~.errors.api_error`);
  once a stream has started, it ends the stream with the adapter's error events instead.

An adapter (completions, chat completions, responses) only parses its body into a
:class:`Turn` and renders chunks and final bodies in its API's shape.
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..batching.types import BatchRequest, BatchResult
from ..engine.tokenizer import Tokenizer
from ..errors import InvalidRequest, ZigllamaBatchError
from ..structured import StructuredOutput
from .backend import Backend, ChunkStream
from .errors import JSON, ApiError, api_error, too_large, validation_error
from .middleware import mark_taken

__all__ = ["DONE", "Adapter", "Core", "Event", "EventStream", "Turn", "Usage", "token_logprob"]


def token_logprob(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    """One generated token's logprob in the shape chat completions and responses share (no
    alternatives: ``top_logprobs`` is empty)."""
    raw = tokenizer.token_bytes(token_id)
    return {
        "token": raw.decode("utf-8", errors="replace"),
        "logprob": logprob,
        "bytes": list(raw),
        "top_logprobs": [],
    }


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, whichever API names them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @classmethod
    def of(cls, result: BatchResult) -> Usage:
        """The counts of a finished request."""
        r = result.result
        return cls(r.prompt_tokens, r.completion_tokens, r.cached_tokens)

    @property
    def total_tokens(self) -> int:
        """Prompt and completion together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: ``data`` (JSON, or a literal such as ``[DONE]``) and its name."""

    data: Mapping[str, Any] | str
    name: str | None = None

    @property
    def sequence_number(self) -> int:
        """The event's place in its stream (-1 for an event that has none)."""
        number = self.data.get("sequence_number", -1) if isinstance(self.data, Mapping) else -1
        return int(number)

    def encode(self) -> bytes:
        """The event on the wire."""
        data = (
            self.data
            if isinstance(self.data, str)
            else json.dumps(self.data, separators=(",", ":"))
        )
        head = f"event: {self.name}\n" if self.name else ""
        return f"{head}data: {data}\n\n".encode()


DONE = Event("[DONE]")
"""The last event of a completions or chat completions stream."""


class Turn(abc.ABC):
    """One request an adapter prepared: what the processor runs, and how its answer reads.

    Args:
        request: what runs.
        stream: answer as server-sent events.
        prompt_param: the request field holding the prompt (named when it is too long).
        constraint: the field whose constraint the output follows, if one does.
    """

    def __init__(
        self,
        request: BatchRequest,
        *,
        stream: bool,
        prompt_param: str,
        constraint: str | None = None,
    ) -> None:
        self.request = request
        self.stream = stream
        self.prompt_param = prompt_param
        self.constraint = constraint

    @property
    def prompt_tokens(self) -> int:
        """How many tokens the prompt runs as."""
        return len(self.request.prompt)

    @abc.abstractmethod
    def body(self, result: BatchResult) -> dict[str, Any]:
        """The answer to a request that was not streamed."""

    @abc.abstractmethod
    def events(self, chunks: ChunkStream) -> AsyncIterator[Event]:
        """The events of a streamed answer, from the request's chunks."""

    def error_events(self, error: ApiError) -> list[Event]:
        """The events that end a stream cut short by ``error``."""
        return [Event(error.body()), DONE]

    def error(self, exc: ZigllamaBatchError) -> ApiError:
        """The HTTP form of a library error this request met."""
        return api_error(exc, prompt_param=self.prompt_param, constraint=self.constraint)


class Adapter(Protocol):
    """An endpoint: its body's schema, and how a validated body becomes a :class:`Turn`."""

    @property
    def schema(self) -> type[BaseModel]: ...

    @property
    def prompt_param(self) -> str:
        """The body field holding the prompt: checked for length before validation, and named
        when it is too long."""
        ...

    async def prepare(self, body: Any) -> Turn:
        """The request a validated body asks for.

        Raises:
            ApiError: the body asks for something this server cannot do.
            ZigllamaBatchError: likewise, as the library says it.
        """
        ...


class Core:
    """What every endpoint shares: body limits, validation, submission, streaming, errors."""

    def __init__(self, processor: Backend, model_name: str, max_body_bytes: int) -> None:
        self.processor = processor
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: Request, adapter: Adapter) -> Response:
        """Answer ``request`` as ``adapter``'s endpoint."""
        turn: Turn | None = None
        try:
            body = await self.parse(request, adapter)
            turn = await adapter.prepare(body)
            mark_taken(request)  # the processor counts the outcome from here, refusals too
            if turn.stream:
                events = self._sse(turn, self.processor.stream(turn.request))
                return EventStream(
                    events,
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            result = await self.submit(request, turn.request)
            if result is None:  # the client went away
                return Response(status_code=499)
            return JSON(turn.body(result))
        except ClientDisconnect:  # gone before the body arrived: nobody to answer
            return Response(status_code=499)
        except ApiError as exc:
            return exc.response()
        except ZigllamaBatchError as exc:
            if turn is not None:
                return turn.error(exc).response()
            return api_error(exc, prompt_param=adapter.prompt_param).response()

    async def parse(self, request: Request, adapter: Adapter) -> Any:
        """The request's body, read within the size limit and validated as ``adapter``'s.

        Raises:
            ApiError: too large, not JSON, not an object, invalid, or another model's.
            PromptTooLong: the prompt certainly does not fit the context.
        """
        data = await self.read_json(request)
        # Before pydantic validates a long list item by item on the loop (34,000 messages:
        # ~0.1 s; 250,000 token ids tried against each type of the prompt's union: ~0.8 s).
        self.processor.check_prompt_length(data.get(adapter.prompt_param))
        try:
            body = adapter.schema.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from exc
        model = getattr(body, "model", None)
        if model is not None and model != self.model_name:
            raise self.not_served(model, param="model")
        return body

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, read within ``max_body_bytes``."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large(self.max_body_bytes)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise too_large(self.max_body_bytes)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5,000-digit int,
            # arrays nested 100,000 deep
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    def not_served(self, model: str, *, param: str | None) -> ApiError:
        """The 404 of a model id this server does not serve."""
        return ApiError(
            404,
            f"model {model!r} is not served here; this server serves {self.model_name!r}",
            type="not_found_error",
            param=param,
            code="model_not_found",
        )

    def room(self, prompt_ids: list[int], asked: int | None, field: str) -> int:
        """The most tokens the context leaves after the prompt.

        Raises:
            ApiError: ``asked`` (the completion length ``field`` asked for) does not fit.
        """
        max_context = self.processor.max_context
        room = max_context - len(prompt_ids)
        if asked is not None and asked > room:
            raise ApiError(
                400,
                f"this model's context holds {max_context} tokens; the prompt has "
                f"{len(prompt_ids)} and {asked} more were asked for ({field})",
                param=field,
                code="context_length_exceeded",
            )
        return room

    async def check_constraint(self, structured: StructuredOutput, field: str | None) -> None:
        """Compile an output constraint off the loop; a refusal names ``field``.

        Raises:
            ApiError: the constraint cannot be followed.
        """
        try:
            await self.processor.check_structured(structured)
        except InvalidRequest as exc:
            raise ApiError(400, f"{field}: {exc}" if field else str(exc), param=field) from exc

    async def submit(self, request: Request, batch_request: BatchRequest) -> BatchResult | None:
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

    @staticmethod
    async def _sse(turn: Turn, chunks: ChunkStream) -> AsyncIterator[bytes]:
        """The turn's events on the wire; an error mid-stream (timeout, stop, engine failure)
        ends it with the turn's error events."""
        try:
            async for event in turn.events(chunks):
                yield event.encode()
        except ZigllamaBatchError as exc:
            for event in turn.error_events(turn.error(exc)):
                yield event.encode()
        finally:
            await chunks.aclose()  # a disconnected client cancels its request here


class EventStream(StreamingResponse):
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


async def _disconnected(request: Request) -> None:
    """Return once the client has disconnected."""
    receive: Callable[[], Awaitable[Mapping[str, Any]]] = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
