"""A request's life inside the processor: its state, its sequence and its single outcome.

Inside: :class:`RequestState` (explicit lifecycle), ``FINISHED`` (the terminal states),
:class:`TrackedRequest`, the record the queue, the scheduler and the caller's future share, and
:func:`error_state`. A request's progress through the model is its
:class:`~zigllama_batch.engine.step.SequenceState` (``seq``), its text its
:class:`~zigllama_batch.engine.output.OutputDecoder`. Every transition happens on the event
loop; ``finish()`` is the one place an outcome is set, so each request ends exactly once.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import Sequence

from ..engine.output import OutputDecoder
from ..engine.scoring import PromptScores
from ..engine.step import SequenceState, TokenSample
from ..errors import InvalidRequest, RequestCancelled, RequestTimeout, ZigllamaBatchError
from ..generation import GenerationConfig, TokenLogprob
from .types import BatchRequest, BatchResult, RequestId, StreamChunk

__all__ = ["FINISHED", "RequestState", "TrackedRequest", "error_state"]


class RequestState(enum.Enum):
    """Where a request is in its life."""

    PREPARING = "preparing"
    """Accepted; its sampling state is being built in a worker thread (its output constraint
    compiled, or copied from the cache); it queues next."""
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INVALID = "invalid"
    """Ended by its own input, found only once accepted: an output constraint that could not be
    continued mid-generation."""
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


FINISHED = frozenset(
    {
        RequestState.COMPLETED,
        RequestState.FAILED,
        RequestState.INVALID,
        RequestState.CANCELLED,
        RequestState.TIMED_OUT,
    }
)
"""States a request never leaves."""


class TrackedRequest:
    """One request as the processor tracks it, from submission to its outcome."""

    __slots__ = (
        "accepted_drafts",
        "admitted",
        "awaits",
        "batch_sizes",
        "cached_tokens",
        "config",
        "deadline",
        "decoder",
        "drafted",
        "finished",
        "first_token",
        "future",
        "id",
        "priority",
        "prompt_ids",
        "request",
        "seq",
        "state",
        "steps",
        "stream",
        "submitted",
    )

    def __init__(
        self,
        request: BatchRequest,
        request_id: RequestId,
        prompt_ids: Sequence[int],
        decoder: OutputDecoder,
        *,
        submitted: float,
        deadline: float | None,
        future: asyncio.Future[BatchResult],
    ) -> None:
        self.request = request
        self.id = request_id
        self.config: GenerationConfig = request.config
        self.priority = request.priority
        self.prompt_ids = list(prompt_ids)
        self.decoder = decoder
        self.submitted = submitted
        self.deadline = deadline
        self.future = future
        self.state = RequestState.QUEUED
        self.finished = False
        """True once the request has its outcome (its state is one of FINISHED); read on every
        step for every sequence, so kept as a flag rather than derived."""
        # Progress through the model; its slot and sampling state are set at admission, and
        # one worker owns it while it runs.
        top = self.config.prompt_logprobs
        self.seq = SequenceState(
            self.prompt_ids,
            scores=None if top is None else PromptScores(self.prompt_ids, top),
            generates=self.config.max_tokens > 0,
        )
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.steps = 0
        self.batch_sizes: list[int] = []
        self.cached_tokens = 0
        """Prompt tokens reused from the prefix cache (set at admission)."""
        self.drafted = 0
        """Drafted tokens verified in this request's steps (speculative decoding)."""
        self.accepted_drafts = 0
        """Of those, the ones accepted."""
        self.awaits: tuple[TrackedRequest, int] | None = None
        """A running request whose prompt shares this one's first ``n`` tokens and is still
        computing them: this one waits, then copies them (set by the scheduler)."""
        # Where streamed chunks go (a RequestStream's buffer), when someone streams it.
        self.stream: asyncio.Queue[StreamChunk | None] | None = None

    @property
    def cache_salt(self) -> str | None:
        """Prefixes are shared only between requests of the same salt."""
        return self.request.cache_salt

    def accept(self, sample: TokenSample, now: float) -> StreamChunk:
        """Take a token a step gave this request (sampled, or forced by its constraint: one of
        :meth:`TokenSample.each`); the chunk of text it adds (the first with the prompt's
        logprobs, when asked for)."""
        first = self.first_token is None
        if first:
            self.first_token = now
        logprob = None if math.isnan(sample.logprob) else sample.logprob
        text = self.decoder.add(sample.token_id, logprob, completes=sample.completes)
        return StreamChunk(
            text,
            sample.token_id,
            self.decoder.finish_reason,
            logprob if self.config.logprobs else None,
            self.prompt_logprobs() if first else None,
        )

    def prompt_logprobs(self) -> tuple[TokenLogprob | None, ...] | None:
        """The prompt's logprobs, when asked for (once its prompt has run)."""
        scores = self.seq.scores
        return None if scores is None else scores.result()

    def finish(
        self,
        state: RequestState,
        *,
        result: BatchResult | None = None,
        error: BaseException | None = None,
    ) -> bool:
        """Give the request its outcome, once. Returns False if it already had one."""
        if self.finished:
            return False
        assert state in FINISHED
        assert (result is None) != (error is None)
        self.state = state
        self.finished = True
        if not self.future.done():
            if result is not None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)  # type: ignore[arg-type]
        if self.stream is not None:
            self.stream.put_nowait(None)  # end of stream; the reader then reads the future
        return True

    def __repr__(self) -> str:
        return (
            f"<TrackedRequest {self.id!r} {self.state.value} priority={self.priority} "
            f"prompt={len(self.prompt_ids)} computed={self.seq.num_computed} slot={self.seq.slot}>"
        )


def error_state(error: BaseException) -> RequestState:
    """The terminal state an error puts a request in."""
    if isinstance(error, RequestTimeout):
        return RequestState.TIMED_OUT
    if isinstance(error, RequestCancelled):
        return RequestState.CANCELLED
    if isinstance(error, InvalidRequest):
        return RequestState.INVALID
    assert isinstance(error, ZigllamaBatchError)
    return RequestState.FAILED
