"""RemoteProcessor: the processor surface the OpenAI app needs, over Ray Serve model replicas.

The ingress replica owns one :class:`RemoteProcessor`. It tokenizes and checks prompts locally
(with the model's own tokenizer, read from the GGUF file), so prefix-aware routing can see token
ids, and sends each :class:`~zigllama_batch.BatchRequest` through a Serve deployment handle to a
:class:`~zigllama_batch.ray_serve.replica.ModelReplica`, whose processor batches it. Streams come
back chunk by chunk over Serve's streaming handle; closing a stream cancels the request in its
replica. Errors arrive as the library's own: a replica's error is unwrapped from Ray's, a full
deployment is :class:`~zigllama_batch.errors.QueueFull`, and a replica that dies mid-request
ends that request with :class:`~zigllama_batch.errors.GenerationError`.

``queue_depth`` and ``running`` are this ingress's view (requests it has in flight); each
replica's own queue, slots and cache are exported through Ray's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from ..batching.lifecycle import ProcessorState
from ..batching.prompts import check_prompt_length, encode_prompt
from ..batching.request import RequestState, error_state
from ..batching.stats import StatsRecorder
from ..batching.types import BatchRequest, BatchResult, StreamChunk
from ..engine.tokenizer import Tokenizer
from ..errors import (
    GenerationError,
    InvalidRequest,
    ProcessorStopped,
    QueueFull,
    RequestCancelled,
    ZigllamaBatchError,
)
from ..generation import Prompt
from ..kv import KVStats
from ..structured import StructuredOutput

__all__ = ["ModelInfo", "RemoteProcessor", "RemoteStream"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """What a model replica serves, as the ingress needs to know it."""

    model_name: str
    max_context: int


class RemoteProcessor:
    """The :class:`~zigllama_batch.server.backend.Backend` of a Ray Serve ingress: tokenizes
    here, runs requests on the model deployment behind ``handle``."""

    def __init__(
        self, handle: DeploymentHandle[Any], tokenizer: Tokenizer, info: ModelInfo
    ) -> None:
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._tokenizer = tokenizer
        self.info = info
        self._state = ProcessorState.NEW
        self._stats = StatsRecorder(time.monotonic)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- what the app reads -------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer."""
        return self._tokenizer

    @property
    def model_name(self) -> str:
        """The model's name."""
        return self.info.model_name

    @property
    def max_context(self) -> int:
        """Positions one sequence may occupy, prompt included."""
        return self.info.max_context

    @property
    def state(self) -> ProcessorState:
        """RUNNING between :meth:`start` and :meth:`aclose`."""
        return self._state

    @property
    def failure(self) -> BaseException | None:
        """Always None: a replica's failure is the replica's (Serve replaces it)."""
        return None

    @property
    def queue_depth(self) -> int:
        """0: requests wait in the replicas' queues (see the replicas' metrics)."""
        return 0

    @property
    def running(self) -> int:
        """Requests this ingress has in flight."""
        return self._inflight

    def kv_stats(self) -> KVStats | None:
        """None: each replica exports its own key/value memory through Ray's metrics."""
        return None

    @property
    def stats_recorder(self) -> StatsRecorder:
        """Outcomes of the requests this ingress sent (observers receive each one)."""
        return self._stats

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start taking requests."""
        if self._state is ProcessorState.NEW:
            self._state = ProcessorState.RUNNING

    async def aclose(self, drain: bool = True, *, drain_timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain``, wait (at most ``drain_timeout`` seconds) for
        those in flight. Idempotent."""
        if self._state is ProcessorState.CLOSED:
            return
        self._state = ProcessorState.DRAINING if drain else ProcessorState.STOPPING
        if drain:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
        self._state = ProcessorState.CLOSED

    # -- requests -----------------------------------------------------------------------------

    def encode_prompt(
        self, prompt: Prompt, *, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """As :meth:`BatchProcessor.encode_prompt <zigllama_batch.BatchProcessor.encode_prompt>`."""
        return encode_prompt(self._tokenizer, self.max_context, prompt, tools=tools)

    def check_prompt_length(self, prompt: object) -> None:
        """As :meth:`BatchProcessor.check_prompt_length
        <zigllama_batch.BatchProcessor.check_prompt_length>`."""
        check_prompt_length(self._tokenizer, self.max_context, prompt)

    async def check_structured(self, structured: StructuredOutput) -> None:
        """Compile an output constraint on a replica (raises InvalidRequest if it does not)."""
        await _translated(self._handle.check_structured.remote(structured))

    async def submit(self, request: BatchRequest) -> BatchResult:
        """Run a request on a replica and return its result; cancelling the caller cancels it
        there."""
        self._begin()
        try:
            result: BatchResult = await _translated(self._handle.submit.remote(request))
        except BaseException as exc:
            self._end(exc, 0, None)
            raise
        self._end(None, result.result.completion_tokens, result)
        return result

    def stream(self, request: BatchRequest) -> RemoteStream:
        """Run a request on a replica and iterate over its chunks."""
        self._begin()
        chunks = self._stream_handle.stream.remote(request)
        assert isinstance(chunks, DeploymentResponseGenerator)
        return RemoteStream(chunks, self._end)

    def _begin(self) -> None:
        if self._state is not ProcessorState.RUNNING:
            self._stats.on_reject()
            raise ProcessorStopped(f"the ingress is {self._state.value}; no new requests")
        self._stats.on_submit()
        self._inflight += 1
        self._idle.clear()

    def _end(self, exc: BaseException | None, generated: int, result: BatchResult | None) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()
        if isinstance(exc, QueueFull | ProcessorStopped):
            self._stats.on_reject()
        elif not isinstance(exc, InvalidRequest):
            self._stats.on_finish(_state_of(exc), generated, result)

    def __repr__(self) -> str:
        return f"<RemoteProcessor {self._state.value} model={self.model_name!r} in_flight={self._inflight}>"


class RemoteStream:
    """One request's chunks from its replica (``async for chunk in stream``); ``aclose()``
    before the end cancels the request in the replica."""

    def __init__(
        self,
        chunks: DeploymentResponseGenerator[Any],
        on_end: Callable[[BaseException | None, int, BatchResult | None], None],
    ) -> None:
        self._chunks = chunks
        self._on_end = on_end
        self._generated = 0
        self._done = False
        self.result: BatchResult | None = None

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await _translated(self._chunks.__anext__())
        except StopAsyncIteration:
            lost = GenerationError("the replica ended the stream without a result")
            self._finish(lost)
            raise lost from None
        except BaseException as exc:
            self._finish(exc)
            raise
        if isinstance(item, BatchResult):
            self.result = item
            self._finish(None)
            raise StopAsyncIteration
        self._generated += 1
        chunk: StreamChunk = item
        return chunk

    async def aclose(self) -> None:
        """Cancel the request in its replica unless it has ended. Idempotent."""
        if not self._done:
            self._chunks.cancel()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
            self._finish(RequestCancelled("the stream was closed before the request ended"))

    def _finish(self, exc: BaseException | None) -> None:
        if not self._done:
            self._done = True
            self._on_end(exc, self._generated, self.result)


def _state_of(exc: BaseException | None) -> RequestState:
    if exc is None:
        return RequestState.COMPLETED
    if isinstance(exc, asyncio.CancelledError):
        return RequestState.CANCELLED
    if isinstance(exc, ZigllamaBatchError):
        return error_state(exc)  # as a local processor counts it
    return RequestState.FAILED


async def _translated(work: Awaitable[_T]) -> _T:
    """Await a call to a replica, its errors translated to the library's own."""
    try:
        return await work
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, ZigllamaBatchError):
            raise cause from None
        if isinstance(cause, RayActorError | ActorUnavailableError):
            raise _replica_lost(cause) from None
        raise GenerationError(f"the model replica failed: {cause!r}") from exc
    except BackPressureError as exc:  # args: (num_queued, max_queued, status, retry_after_s)
        bound = exc.args[1] if len(exc.args) > 1 else 0
        raise QueueFull(int(bound), exc.retry_after_s or 1.0) from exc
    except (RayActorError, ActorUnavailableError) as exc:
        raise _replica_lost(exc) from exc
    except DeploymentUnavailableError as exc:
        raise ProcessorStopped(f"the model deployment is unavailable: {exc}") from exc
    except RequestCancelledError as exc:
        raise RequestCancelled("the request was cancelled") from exc


def _replica_lost(exc: BaseException) -> GenerationError:
    return GenerationError(
        "the model replica serving this request stopped before it finished "
        f"({type(exc).__name__}); Serve replaces the replica, retry the request"
    )
