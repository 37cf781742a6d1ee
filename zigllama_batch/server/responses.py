"""``POST /v1/responses`` (OpenAI's Responses API), and ``GET``/``DELETE /v1/responses/{id}``.

Inside: :class:`Responses`, the adapter: the body (:mod:`.responses_schema`) becomes the chat
messages of the conversation so far (a stored earlier turn's, then the input items, after any
``instructions``), run as one request; its answer is rendered as a response object whose
``output`` holds a ``message`` (``output_text``) and/or ``function_call`` items (see
:mod:`.responses_output`), stored when ``store`` is true. Tools follow the chat completions
adapter exactly (:mod:`.tools`): ``required`` or a named function constrain the answer to a
call; ``auto`` is served where the chat template renders tools.

An unknown ``previous_response_id`` (never stored, dropped from the bounded store, or stored with
``store: false``) is a 404 in OpenAI's error shape, code ``previous_response_not_found``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..batching.types import BatchRequest
from ..errors import InvalidRequest, PromptTooLong
from ..structured import StructuredOutput
from .core import Core, Event, EventStream
from .errors import JSON, ApiError
from .responses_events import replay
from .responses_output import ResponseTurn
from .responses_schema import ResponsesRequest, items_to_messages
from .store import ResponseStore
from .tools import ToolPlan, with_tools

__all__ = ["Responses"]


class Responses:
    """The adapter of ``POST /v1/responses``, and the handlers of stored responses."""

    schema = ResponsesRequest
    prompt_param = "input"

    def __init__(self, core: Core, store: ResponseStore) -> None:
        self.core = core
        self.store = store

    async def prepare(self, body: ResponsesRequest) -> ResponseTurn:
        """The request the body asks for.

        Raises:
            ApiError: a field asks for what is not served (400), or the previous response is
                not stored (404).
            PromptTooLong: the conversation does not fit the context.
        """
        try:
            return await self._prepare(body)
        except PromptTooLong:
            raise
        except InvalidRequest as exc:
            raise _invalid(exc) from exc

    async def _prepare(self, body: ResponsesRequest) -> ResponseTurn:
        core, tokenizer = self.core, self.core.processor.tokenizer
        body.check_supported()
        earlier: tuple[dict[str, Any], ...] = ()
        if body.previous_response_id is not None:
            stored = self.store.get(body.previous_response_id)
            if stored is None:
                raise ApiError(
                    404,
                    f"previous response with id {body.previous_response_id!r} not found (never "
                    "stored, stored with store: false, or dropped from the bounded store)",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            earlier = stored.items
        template_calls = tokenizer.calls_tools_in_tags
        plan = body.tool_plan(template_calls=template_calls)
        items = body.input_items()
        messages = [
            *items_to_messages(list(earlier), template_calls=template_calls, field="previous"),
            *items_to_messages(items, template_calls=template_calls),
        ]
        if not messages:
            raise InvalidRequest("input: give at least one input item")
        if body.instructions:
            messages.insert(0, {"role": "system", "content": body.instructions})
        prompt_ids = self._encode(messages, plan)
        room = core.room(prompt_ids, body.max_output_tokens, "max_output_tokens")
        config = body.generation_config(max_tokens=body.max_output_tokens or room)
        constraint = None
        structured: StructuredOutput | None = config.structured
        if plan is not None:
            structured, constraint = plan.structured, _tool_field(body, plan)
            config = config.with_(structured=structured)
        elif structured is not None:
            constraint = "text.format"
        if structured is not None:
            await core.check_constraint(structured, constraint)
        request = BatchRequest(
            prompt=prompt_ids,
            config=config,
            priority=body.priority,
            id=f"resp_{uuid.uuid4().hex}",
            cache_salt=body.cache_salt,
        )
        return ResponseTurn(
            request,
            body,
            model=core.model_name,
            plan=plan,
            tokenizer=tokenizer,
            conversation=(*earlier, *items),
            store=self.store if body.store else None,
            constraint=constraint,
        )

    def _encode(self, messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[int]:
        processor = self.core.processor
        if plan is None:
            return processor.encode_prompt(messages)
        if plan.via_template:
            return processor.encode_prompt(messages, tools=plan.template_tools())
        return processor.encode_prompt(with_tools(messages, plan))

    # -- stored responses ----------------------------------------------------------------------

    async def retrieve(self, request: Request) -> Response:
        """``GET /v1/responses/{id}``: a stored response as it was answered (with
        ``stream=true``, as the events of its stream, after ``starting_after``)."""
        response_id = request.path_params["response_id"]
        stored = self.store.get(response_id)
        if stored is None:
            return _not_stored(response_id).response()
        query = request.query_params
        if query.get("stream", "false").lower() in ("false", "0"):
            return JSON(stored.response)
        after = query.get("starting_after", "-1")
        if not after.lstrip("-").isdigit():
            return ApiError(
                400, "starting_after: must be an integer", param="starting_after"
            ).response()
        events = [e for e in replay(stored.response) if e.sequence_number > int(after)]
        return EventStream(_encoded(events), media_type="text/event-stream")

    async def delete(self, request: Request) -> Response:
        """``DELETE /v1/responses/{id}``: forget a stored response."""
        response_id = request.path_params["response_id"]
        if not self.store.delete(response_id):
            return _not_stored(response_id).response()
        return JSON({"id": response_id, "object": "response", "deleted": True})


async def _encoded(events: list[Event]) -> AsyncIterator[bytes]:
    for event in events:
        yield event.encode()


def _not_stored(response_id: str) -> ApiError:
    return ApiError(
        404,
        f"response with id {response_id!r} not found",
        type="not_found_error",
        param="response_id",
        code="response_not_found",
    )


def _tool_field(body: ResponsesRequest, plan: ToolPlan) -> str:
    """The field a tool call's constraint comes from: the named function's parameters, or
    ``tools`` when any tool may be called."""
    names = [t.get("name") for t in body.tools or ()]
    if plan.named is not None and plan.named in names:
        return f"tools[{names.index(plan.named)}].parameters"
    return "tools"


_PARAM = re.compile(r"^[A-Za-z_][\w.\[\]]*$")


def _invalid(exc: InvalidRequest) -> ApiError:
    """A refusal as a 400 naming the field its message starts with (``input[2].content``)."""
    field, sep, _ = str(exc).partition(":")
    return ApiError(400, str(exc), param=field if sep and _PARAM.match(field) else None)
