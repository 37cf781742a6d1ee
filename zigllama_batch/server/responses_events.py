"""The output of a Responses API answer, written item by item, and the events that say so.

Inside: :class:`OutputWriter`: whole items for an answer that is not streamed (:meth:`message`,
:meth:`call`), or items opened, extended and closed as a stream goes, each step returning the
events OpenAI sends for it (``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``, ``response.function_call_arguments.delta``, their ``done``
events), numbered by ``sequence_number`` across the whole stream; and :func:`replay`, the
events of a stored response, sent again. A message holds one
``output_text`` part; a function call is one ``function_call`` item.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from .core import Event

__all__ = ["OutputWriter", "replay"]

_ENDS = {"completed": "response.completed", "incomplete": "response.incomplete"}
"""The last event of a finished response, by status (any other: ``response.failed``)."""


def replay(response: Mapping[str, Any]) -> list[Event]:
    """The events a finished response's stream sends, each item's text or arguments in one
    delta (``GET /v1/responses/{id}?stream=true``)."""
    writer = OutputWriter()
    snapshot = {
        **{k: v for k, v in response.items() if k not in ("usage", "completed_at")},
        "status": "in_progress",
        "output": [],
        "incomplete_details": None,
    }
    events = [
        writer.event("response.created", response=snapshot),
        writer.event("response.in_progress", response=snapshot),
    ]
    for item in response["output"]:
        if item["type"] == "message":
            part = item["content"][0]
            events += writer.open_message(item["id"])
            if part["text"]:
                events.append(writer.text(part["text"], part["logprobs"]))
            events += writer.close_message(item["status"])
        else:
            function = {"name": item["name"], "arguments": item["arguments"]}
            events += writer.call_delta({"id": item["call_id"], "function": function}, item["id"])
            events += writer.close_call(item["status"])
    kind = _ENDS.get(response["status"], "response.failed")
    events.append(writer.event(kind, response=dict(response)))
    return events


class OutputWriter:
    """A response's output items as they are written, and the events that say so."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.sequence = 0
        self.open_message_index: int | None = None
        self.open_call_index: int | None = None

    def event(self, kind: str, **fields: Any) -> Event:
        """The next event of the stream."""
        event = Event({"type": kind, **fields, "sequence_number": self.sequence}, name=kind)
        self.sequence += 1
        return event

    # whole items, for an answer that is not streamed

    def message(self, text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        """Add a whole message."""
        self.items.append(_message(text, status, logprobs or []))

    def call(self, call: dict[str, Any], status: str) -> None:
        """Add a whole function call (``call`` as chat completions' ``tool_calls`` hold it)."""
        function = call["function"]
        self.items.append(_call(call["id"], function["name"], function["arguments"], status))

    # items written piece by piece, for a stream

    def open_message(self, item_id: str | None = None) -> list[Event]:
        """Start a message (``item_id``: its id, when it has one already)."""
        self.open_message_index = index = len(self.items)
        item = _message("", "in_progress", [], item_id)
        self.items.append(item)
        added = {**item, "content": []}
        return [
            self.event("response.output_item.added", output_index=index, item=added),
            self.event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=_text_part(""),
            ),
        ]

    def text(self, delta: str, logprobs: list[dict[str, Any]] | None = None) -> Event:
        """More text of the open message."""
        assert self.open_message_index is not None
        index = self.open_message_index
        item = self.items[index]
        part = item["content"][0]
        part["text"] += delta
        part["logprobs"] += logprobs or []
        return self.event(
            "response.output_text.delta",
            item_id=item["id"],
            output_index=index,
            content_index=0,
            delta=delta,
            logprobs=[{k: lp[k] for k in ("token", "logprob")} for lp in logprobs or []],
        )

    def text_anywhere(self, delta: str) -> list[Event]:
        """More text, opening a message first if none is open (none for no text)."""
        if not delta:
            return []
        opened = self.open_message() if self.open_message_index is None else []
        return [*opened, self.text(delta)]

    def close_message(self, status: str) -> list[Event]:
        """End the open message, if one is open."""
        index = self.open_message_index
        if index is None:
            return []
        self.open_message_index = None
        item = self.items[index]
        item["status"] = status
        part = item["content"][0]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        logprobs = [{k: lp[k] for k in ("token", "logprob")} for lp in part["logprobs"]]
        return [
            self.event("response.output_text.done", **where, text=part["text"], logprobs=logprobs),
            self.event("response.content_part.done", **where, part=dict(part)),
            self.event("response.output_item.done", output_index=index, item=dict(item)),
        ]

    def call_delta(self, delta: dict[str, Any], item_id: str | None = None) -> list[Event]:
        """A chat completions tool-call delta as the events of a function call item
        (``item_id``: the item's id, when it has one already)."""
        events = []
        function = delta.get("function", {})
        if "id" in delta:  # the call starts
            self.open_call_index = index = len(self.items)
            item = _call(delta["id"], function.get("name", ""), "", "in_progress", item_id)
            self.items.append(item)
            events.append(
                self.event("response.output_item.added", output_index=index, item=dict(item))
            )
        arguments = function.get("arguments") or ""
        if arguments:
            assert self.open_call_index is not None
            index = self.open_call_index
            item = self.items[index]
            item["arguments"] += arguments
            events.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=arguments,
                )
            )
        return events

    def close_call(self, status: str) -> list[Event]:
        """End the open function call."""
        index = self.open_call_index
        assert index is not None
        self.open_call_index = None
        item = self.items[index]
        item["status"] = status
        return [
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            ),
            self.event("response.output_item.done", output_index=index, item=dict(item)),
        ]


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _message(
    text: str, status: str, logprobs: list[dict[str, Any]], item_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": item_id or f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [_text_part(text, logprobs)],
    }


def _call(
    call_id: str, name: str, arguments: str, status: str, item_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": item_id or f"fc_{uuid.uuid4().hex}",
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }
