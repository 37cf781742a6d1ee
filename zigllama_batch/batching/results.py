"""The result of a request that finished generating: its output and when things happened.

Inside: :func:`batch_result`. The output itself (text, tokens, finish reason, logprobs) comes
from the request's :meth:`~zigllama_batch.engine.output.OutputDecoder.result`, the one place a
:class:`~zigllama_batch.generation.GenerationResult` is made (:class:`TextGenerator` uses it
too); here it gets the processor's timings: latency, queue time and time to first token from
the processor's clock, the steps and batch sizes the request ran in, and the prompt's logprobs
its sequence gathered.
"""

from __future__ import annotations

from .request import TrackedRequest
from .types import BatchResult, RequestTimeline

__all__ = ["batch_result"]

_MS = 1000.0


def batch_result(rec: TrackedRequest, finished: float) -> BatchResult:
    """The :class:`BatchResult` of a request whose decoder has finished, at clock time
    ``finished``."""
    assert rec.admitted is not None, "a finished request was admitted"
    assert rec.first_token is not None, "a finished request has generated a token"
    ttft_ms = (rec.first_token - rec.submitted) * _MS
    latency_ms = (finished - rec.submitted) * _MS
    return BatchResult(
        id=rec.id,
        result=rec.decoder.result(
            time_to_first_token_ms=ttft_ms,
            total_time_ms=latency_ms,
            cached_tokens=rec.cached_tokens,
            draft_tokens=rec.drafted,
            accepted_draft_tokens=rec.accepted_drafts,
            prompt_logprobs=rec.prompt_logprobs(),
        ),
        latency_ms=latency_ms,
        queue_time_ms=(rec.admitted - rec.submitted) * _MS,
        time_to_first_token_ms=ttft_ms,
        batch_size=max(rec.batch_sizes, default=0),
        timeline=RequestTimeline(
            submitted=rec.submitted,
            admitted=rec.admitted,
            first_token=rec.first_token,
            finished=finished,
            steps=rec.steps,
            batch_sizes=tuple(rec.batch_sizes),
        ),
    )
