"""What ``/v1/completions`` and ``/v1/chat/completions`` share: answers made of ``choices``.

Inside: :func:`prepare_sampling` (a completions or chat body, with its prompt's ids, as the
:class:`~zigllama_batch.BatchRequest` it asks for), :class:`ChoiceTurn` (the envelope of an answer
and of each streamed chunk: id, object, created, model, and the usage ``stream_options`` asks
for) and :func:`usage_body` (usage in these APIs' names). The two adapters differ only in how a
choice reads.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..batching.types import BatchRequest, BatchResult
from ..structured import StructuredOutput
from .backend import ChunkStream
from .core import DONE, Core, Event, Turn, Usage
from .schema import ChatCompletionRequest, CompletionRequest, generation_config

__all__ = ["ChoiceTurn", "prepare_sampling", "usage_body"]


async def prepare_sampling(
    core: Core,
    body: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    *,
    id_prefix: str,
    structured: StructuredOutput | None = None,
    constraint: str | None = None,
) -> tuple[BatchRequest, str | None]:
    """The request ``body`` asks for, over ``prompt_ids``, and the field its output
    constraint comes from (None: the output is free).

    Args:
        core: the core the endpoint runs on.
        body: the validated body.
        prompt_ids: the prompt's token ids.
        id_prefix: the answer id's prefix (``cmpl``, ``chatcmpl``).
        structured: a constraint that overrides the body's own (a tool call's).
        constraint: the field ``structured`` comes from (default: the body's field that
            constrains the output).

    Raises:
        ApiError: the completion length asked for does not fit, or the constraint is refused.
        InvalidRequest: a field asks for what this server does not implement.
    """
    room = core.room(prompt_ids, body.requested_max_tokens(), body.max_tokens_field())
    config = generation_config(body, max_tokens_default=room)
    if structured is not None:
        config = config.with_(structured=structured)
    if config.structured is not None:  # compiled off the loop, errors named by field
        if constraint is None:
            asked = body.structured()
            constraint = asked[0] if asked else None
        await core.check_constraint(config.structured, constraint)
    request = BatchRequest(
        prompt=prompt_ids,
        config=config,
        priority=body.priority,
        id=f"{id_prefix}-{uuid.uuid4().hex}",
        cache_salt=body.cache_salt,
    )
    return request, constraint


def usage_body(usage: Usage, *, details: bool = True) -> dict[str, Any]:
    """Usage as completions and chat completions name it (``details``: with cached tokens)."""
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if details:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return body


class ChoiceTurn(Turn):
    """A completions or chat completions request: one choice, answered whole or in chunks.

    Subclasses say how a choice reads (:meth:`choice`) and how chunks become choice deltas
    (:meth:`deltas`); the envelope and usage are here.
    """

    kind: str
    """The answer's ``object``."""
    chunk_kind: str
    """Each streamed chunk's ``object``."""

    def __init__(
        self,
        request: BatchRequest,
        body: CompletionRequest | ChatCompletionRequest,
        *,
        model: str,
        prompt_param: str,
        constraint: str | None = None,
    ) -> None:
        super().__init__(
            request, stream=body.stream, prompt_param=prompt_param, constraint=constraint
        )
        self.model = model
        options = body.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = bool(options and options.continuous_usage_stats)
        self.generated = 0  # tokens streamed so far, for continuous usage

    @property
    def id(self) -> str:
        """The answer's id (the request's)."""
        return str(self.request.id)

    def body(self, result: BatchResult) -> dict[str, Any]:
        """The whole answer."""
        return {
            "id": self.id,
            "object": self.kind,
            "created": int(time.time()),
            "model": self.model,
            "choices": [self.choice(result)],
            "usage": usage_body(Usage.of(result)),
        }

    @abc.abstractmethod
    def choice(self, result: BatchResult) -> dict[str, Any]:
        """The one choice of a whole answer."""

    @abc.abstractmethod
    def deltas(self, chunks: ChunkStream) -> AsyncIterator[dict[str, Any]]:
        """The streamed choices (each chunk counted in :attr:`generated` as it arrives)."""

    async def events(self, chunks: ChunkStream) -> AsyncIterator[Event]:
        """Each choice delta in a chunk, the usage chunk when asked for, then ``[DONE]``."""
        created = int(time.time())
        async for choice in self.deltas(chunks):
            yield self._chunk(created, [choice])
        result = chunks.result
        assert result is not None
        if self.include_usage:
            yield self._chunk(created, [], usage_body(Usage.of(result)))
        yield DONE

    def _chunk(
        self, created: int, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> Event:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": self.chunk_kind,
            "created": created,
            "model": self.model,
            "choices": choices,
        }
        if self.continuous_usage and usage is None:
            usage = usage_body(Usage(self.prompt_tokens, self.generated), details=False)
        if self.include_usage or self.continuous_usage:
            payload["usage"] = usage
        return Event(payload)
