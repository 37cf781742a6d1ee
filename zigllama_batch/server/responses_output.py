"""A Responses API answer: the response object, its output items, and its stream of events.

Inside: :class:`ResponseTurn`, one ``POST /v1/responses`` request once prepared: it renders the
whole response, or streams it, writing its output through
:class:`~.responses_events.OutputWriter`.

A stream goes as OpenAI's does: ``response.created`` and ``response.in_progress`` (the response
with no output yet); for a message, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` per piece of text,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``;
for a function call, ``response.output_item.added``, ``response.function_call_arguments.delta``
per piece of arguments, ``response.function_call_arguments.done``,
``response.output_item.done``; then ``response.completed``, or ``response.incomplete`` when
``max_output_tokens`` cut the answer short. A stream cut short by an error ends with ``error``
and ``response.failed``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from ..batching.types import BatchRequest, BatchResult
from ..engine.tokenizer import Tokenizer
from ..generation import FinishReason
from .backend import ChunkStream
from .core import Event, Turn, Usage, token_logprob
from .errors import ApiError
from .responses_events import OutputWriter
from .responses_schema import ResponsesRequest
from .store import ResponseStore, StoredResponse
from .tools import TaggedCallStream, ToolCallDeltas, ToolPlan, complete, tagged_calls, tool_calls

__all__ = ["ResponseTurn"]


class ResponseTurn(Turn):
    """One Responses API request, prepared.

    Args:
        request: what runs (its id is the response's).
        body: the validated body (echoed in the response object).
        model: the served model's id.
        plan: the tool call asked for, if any.
        tokenizer: for the chosen tokens' logprobs.
        conversation: the items of every turn so far, this one's input last (stored with the
            output when ``store`` is given).
        store: where to keep the answer (None: not stored).
        constraint: the field the output constraint comes from.
    """

    def __init__(
        self,
        request: BatchRequest,
        body: ResponsesRequest,
        *,
        model: str,
        plan: ToolPlan | None,
        tokenizer: Tokenizer,
        conversation: tuple[dict[str, Any], ...],
        store: ResponseStore | None,
        constraint: str | None,
    ) -> None:
        super().__init__(request, stream=body.stream, prompt_param="input", constraint=constraint)
        self.request_body = body
        self.model = model
        self.plan = plan
        self.tokenizer = tokenizer
        self.conversation = conversation
        self.store = store
        self.created = int(time.time())
        self.output = OutputWriter()

    @property
    def id(self) -> str:
        """The response's id."""
        return str(self.request.id)

    # -- whole -------------------------------------------------------------------------------

    def body(self, result: BatchResult) -> dict[str, Any]:
        """The response object of an answer that was not streamed."""
        r = result.result
        plan, out, status = self.plan, self.output, _status(r.finish_reason)
        if plan is None:
            out.message(r.text, status, self._logprobs(r.token_ids, r.logprobs))
        elif not plan.auto:
            calls = tool_calls(plan, r.text)
            if calls is None:  # not even the name came out: the text is the answer
                out.message(r.text, status)
            else:
                whole = complete(plan, r.text) and r.finish_reason == FinishReason.STOP
                out.call(calls[0], "completed" if whole else "incomplete")
        else:
            head, found = tagged_calls(plan, r.text)
            if not found or head:
                out.message(head if found else r.text, status)
            for call in found:
                out.call(call, "completed")
        return self._finish(Usage.of(result), r.finish_reason)

    def _finish(self, usage: Usage, finish: FinishReason) -> dict[str, Any]:
        """The finished response object (stored when asked)."""
        status = _status(finish)
        response = self.snapshot(status)
        response["usage"] = {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        }
        if status == "incomplete":
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        response["completed_at"] = int(time.time())
        if self.store is not None:
            items = (*self.conversation, *self.output.items)
            self.store.put(self.id, StoredResponse(response, items))
        return response

    def snapshot(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object now (no usage until it is finished)."""
        b = self.request_body
        fmt = b.text.format if b.text is not None else None
        text_format: dict[str, Any] = {"type": "text"}
        if fmt is not None and fmt.type == "json_schema":
            text_format = {
                "type": "json_schema",
                "name": fmt.name,
                "schema": fmt.schema_,
                "strict": fmt.strict,
            }
            if fmt.description is not None:
                text_format["description"] = fmt.description
        elif fmt is not None:
            text_format = {"type": fmt.type}
        tools = [
            {
                "type": "function",
                "name": t.get("name"),
                "description": t.get("description"),
                "parameters": t.get("parameters"),
                "strict": t.get("strict"),
            }
            for t in b.tools or ()
        ]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.model,
            "output": [dict(item) for item in self.output.items],
            "parallel_tool_calls": b.parallel_tool_calls,
            "previous_response_id": b.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": b.store,
            "temperature": b.temperature,
            "text": {"format": text_format, "verbosity": "medium"},
            "tool_choice": b.tool_choice if b.tool_choice is not None else "auto",
            "tools": tools,
            "top_p": b.top_p,
            "truncation": "disabled",
            "metadata": b.metadata or {},
            "background": False,
            **({"user": b.user} if b.user is not None else {}),
        }

    def _logprobs(
        self, token_ids: tuple[int, ...] | list[int], logprobs: Any
    ) -> list[dict[str, Any]] | None:
        if logprobs is None:
            return None
        return [
            token_logprob(self.tokenizer, t, lp) for t, lp in zip(token_ids, logprobs, strict=True)
        ]

    # -- streamed ----------------------------------------------------------------------------

    async def events(self, chunks: ChunkStream) -> AsyncIterator[Event]:
        """The response's events, from the request's chunks."""
        out = self.output
        yield out.event("response.created", response=self.snapshot("in_progress"))
        yield out.event("response.in_progress", response=self.snapshot("in_progress"))
        plan = self.plan
        calls = ToolCallDeltas(plan) if plan is not None and not plan.auto else None
        tagged = TaggedCallStream(plan) if plan is not None and plan.auto else None
        text = ""  # all of the answer, for a call cut short before its name
        finish: FinishReason | None = None
        if plan is None:
            for event in out.open_message():
                yield event
        async for chunk in chunks:
            text += chunk.text
            finish = chunk.finish_reason
            if plan is None:
                if chunk.text or chunk.logprob is not None:
                    logprobs = None
                    if chunk.logprob is not None:
                        logprobs = [token_logprob(self.tokenizer, chunk.token_id, chunk.logprob)]
                    yield out.text(chunk.text, logprobs)
            elif calls is not None:
                for delta in calls.feed(chunk.text, final=finish is not None):
                    for event in out.call_delta(delta):
                        yield event
            elif tagged is not None and (sendable := tagged.feed(chunk.text)):
                for event in out.text_anywhere(sendable):
                    yield event
        assert finish is not None
        status = _status(finish)
        if plan is None:
            for event in out.close_message(status):
                yield event
        elif calls is not None:
            if out.open_call_index is None:  # no name came out: the text is the answer
                for event in [*out.text_anywhere(text), *out.close_message(status)]:
                    yield event
            else:
                whole = calls.whole and finish == FinishReason.STOP
                for event in out.close_call("completed" if whole else "incomplete"):
                    yield event
        elif tagged is not None:
            rest, deltas = tagged.finish()
            for event in [*out.text_anywhere(rest), *out.close_message(status)]:
                yield event
            for delta in deltas:
                for event in [*out.call_delta(delta), *out.close_call("completed")]:
                    yield event
        result = chunks.result
        assert result is not None
        response = self._finish(Usage.of(result), finish)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        yield out.event(kind, response=response)

    def error_events(self, error: ApiError) -> list[Event]:
        """``error``, then ``response.failed`` with the error in the response."""
        out = self.output
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        if 400 <= error.status < 500 and error.status != 429:
            code = "invalid_prompt"
        return [
            out.event("error", code=error.code, message=error.message, param=error.param),
            out.event(
                "response.failed",
                response=self.snapshot("failed", {"code": code, "message": error.message}),
            ),
        ]


def _status(finish: FinishReason) -> str:
    return "incomplete" if finish == FinishReason.LENGTH else "completed"
