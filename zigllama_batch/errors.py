"""The exception tree of zigllama_batch.

Every error the library raises on purpose derives from :class:`ZigllamaBatchError`, so a caller
can catch the whole family at once. Other libraries' exceptions are translated at the edges
(file parsing, downloads, HTTP) and chained with ``raise ... from``::

    ZigllamaBatchError
    ├── ModelLoadError            the model file is missing, malformed or unsupported
    ├── InvalidRequest            a request or setting a caller passed is not usable (also a ValueError)
    │   ├── PromptTooLong         the prompt does not fit the context window
    │   └── ConstraintFailed      the request's output constraint could not be continued
    ├── QueueFull                 the processor's waiting queue is at its bound (retry later)
    ├── ProcessorStopped          the processor is closed, closed without draining, or its drain timed out
    ├── RequestCancelled          the request was cancelled before it finished
    ├── RequestTimeout            the request's deadline passed
    ├── GenerationError           the engine failed while running the request's step
    └── CallbackFailed            the request's token callback raised (the cause is chained)
"""

from __future__ import annotations

__all__ = [
    "CallbackFailed",
    "ConstraintFailed",
    "GenerationError",
    "InvalidRequest",
    "ModelLoadError",
    "ProcessorStopped",
    "PromptTooLong",
    "QueueFull",
    "RequestCancelled",
    "RequestTimeout",
    "ZigllamaBatchError",
]


class ZigllamaBatchError(Exception):
    """Root of every error zigllama_batch raises on purpose."""


class ModelLoadError(ZigllamaBatchError):
    """A model file could not be found, fetched, parsed or used."""


class InvalidRequest(ZigllamaBatchError, ValueError):
    """A request, prompt or setting passed by the caller is not usable."""


class PromptTooLong(InvalidRequest):
    """The prompt (plus at least one generated token) does not fit the context window.

    Attributes:
        prompt_tokens: how many tokens the prompt encodes to (a lower bound for prompts too long
            to be worth encoding).
        max_context: how many tokens a sequence may hold in total.
    """

    def __init__(self, prompt_tokens: int, max_context: int, *, at_least: bool = False) -> None:
        super().__init__(
            f"prompt has {'at least ' if at_least else ''}{prompt_tokens} tokens but the context "
            f"holds {max_context} (the prompt must leave room for at least one generated token)"
        )
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context

    def __reduce__(self) -> tuple[type[PromptTooLong], tuple[int, int]]:
        return (type(self), (self.prompt_tokens, self.max_context))


class QueueFull(ZigllamaBatchError):
    """The waiting queue holds ``max_queue_size`` requests; nothing was queued.

    Attributes:
        retry_after_s: a hint, in seconds, of when a slot in the queue should be free, estimated
            from the current drain rate.
    """

    def __init__(self, max_queue_size: int, retry_after_s: float) -> None:
        super().__init__(
            f"the request queue is full ({max_queue_size} waiting); "
            f"retry in about {retry_after_s:.1f} s"
        )
        self.max_queue_size = max_queue_size
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[type[QueueFull], tuple[int, float]]:
        return (type(self), (self.max_queue_size, self.retry_after_s))


class ProcessorStopped(ZigllamaBatchError):
    """The processor is closed, or was closed without draining while the request was pending."""


class RequestCancelled(ZigllamaBatchError):
    """The request was cancelled (its caller went away, or it was aborted) before it finished."""


class RequestTimeout(ZigllamaBatchError):
    """The request's deadline passed before it finished."""


class GenerationError(ZigllamaBatchError):
    """The engine raised while running a step that included this request."""


class ConstraintFailed(InvalidRequest):
    """The request's output constraint could not go on mid-generation (the text so far broke one
    of llguidance's parser limits, or no token could continue it); only this request ends. The
    constraint is the caller's, so this is an invalid request found late, not an engine
    failure."""


class CallbackFailed(ZigllamaBatchError):
    """The request's token callback raised; the request ends with this error (chained)."""
