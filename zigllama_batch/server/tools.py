"""Tool calls on structured output: ``tools`` with ``tool_choice`` ``"required"`` or a named
function constrain the answer to a call, returned as OpenAI's ``message.tool_calls``.

Inside: :func:`plan_tools` (what a chat request's ``tools`` and ``tool_choice`` ask for, as a
:class:`ToolPlan` holding the constraint), :func:`with_tools` (the tool definitions put before
the conversation), :func:`tool_calls` (the answer's text as OpenAI's ``tool_calls``) and
:class:`ToolCallDeltas` (the same, streamed as OpenAI streams tool-call deltas).

The constrained text is JSON: for a named function, its arguments (valid against the function's
``parameters``); for ``"required"``, ``{"name": ..., "arguments": ...}`` with the name one of the
tools' and the arguments valid against that tool's parameters. One call per answer.

With a chat template that renders tools and has the model call them inside
``<tool_call>...</tool_call>`` (the Hermes format: Qwen2.5, Qwen3, SmolLM3), the tools go to the
template, and ``tool_choice="auto"`` is served: the model answers freely, and the calls it writes
in those tags come back as ``tool_calls`` (:func:`tagged_calls`, :class:`TaggedCallStream`).
With any other template, the tools are listed in a system message, and ``"auto"`` is refused
with a 400 saying why (the default model's template renders no tools and defines no call
format).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.tokenizer import text_messages
from ..errors import InvalidRequest
from ..structured import StructuredOutput

__all__ = [
    "TaggedCallStream",
    "ToolCallDeltas",
    "ToolPlan",
    "plan_tools",
    "tagged_calls",
    "tool_calls",
    "with_tools",
]

_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """A request's tool call: the function when named (else one of ``tools``), and the
    constraint its answer follows."""

    tools: tuple[dict[str, Any], ...]  # OpenAI's function objects: name, description, parameters
    named: str | None
    structured: StructuredOutput | None  # None for "auto": the model decides
    call_id: str
    via_template: bool = False  # the chat template renders the tools (else a system message)

    @property
    def auto(self) -> bool:
        """The model may answer with text or with calls (``tool_choice="auto"``)."""
        return self.structured is None

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as Hugging Face passes them to a chat template."""
        return [{"type": "function", "function": f} for f in self.tools]


def plan_tools(
    tools: Sequence[dict[str, Any]] | None, tool_choice: object, *, template_calls: bool = False
) -> ToolPlan | None:
    """What ``tools`` and ``tool_choice`` ask for; None when the answer is free text.
    ``template_calls``: the chat template renders tools and has calls written in tags.

    Raises:
        InvalidRequest: a choice this server cannot serve, a named function not among the
            tools, duplicate names, or a ``parameters`` schema that is not an object schema.
    """
    functions = [dict(t["function"]) for t in tools or ()]
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    named_choice = isinstance(choice, dict) and choice.get("type") == "function"
    if choice not in ("none", "auto", "required") and not named_choice:
        raise InvalidRequest(
            f"tool_choice: {choice!r:.80} is not served; use 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}'
        )
    if choice == "none" or (choice == "auto" and not functions):  # nothing could be called
        return None
    if not functions:
        raise InvalidRequest(f"tool_choice: {choice!r} needs at least one tool in tools")
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: function names must be distinct")
    for f in functions:
        parameters = f.get("parameters")
        if parameters is None:
            f["parameters"] = _EMPTY_PARAMETERS
        elif not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidRequest(f"tools: the parameters of {f['name']!r} must be an object schema")
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    if choice == "auto":
        if not template_calls:
            raise InvalidRequest(
                "tool_choice: 'auto' needs a model whose chat template renders tools and says "
                "how it calls one; this model's does not. Use 'required' or name a function."
            )
        return ToolPlan(tuple(functions), None, None, call_id, via_template=True)
    if choice == "required":
        schema = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for f in functions
            ]
        }
        structured = StructuredOutput.json_schema(schema)
        return ToolPlan(tuple(functions), None, structured, call_id, via_template=template_calls)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    chosen = next((f for f in functions if f["name"] == name), None)
    if chosen is None:
        raise InvalidRequest(f"tool_choice: no tool named {name!r} in tools ({', '.join(names)})")
    structured = StructuredOutput.json_schema(chosen["parameters"])
    return ToolPlan((chosen,), name, structured, call_id, via_template=template_calls)


def with_tools(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """The conversation with the tools described in its system message (added if missing)."""
    listed = "\n".join(
        json.dumps(
            {
                "name": f["name"],
                "description": f.get("description") or "",
                "parameters": f["parameters"],
            },
            separators=(",", ":"),
        )
        for f in plan.tools
    )
    note = (
        f"Call the function {plan.named} with JSON arguments.\n{listed}"
        if plan.named
        else f'Call one of these functions, as {{"name": ..., "arguments": {{...}}}}:\n{listed}'
    )
    messages = text_messages(messages)  # content parts joined: the note is appended to text
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _split(plan: ToolPlan, text: str) -> tuple[str | None, str, bool]:
    """The function's name (None while unknown), its arguments' text so far, and whether the
    call is whole (a stop string or a stop token can cut one short)."""
    if plan.named is not None:
        return plan.named, text, _parses(text)
    head = '{"name":'
    if not text.startswith(head):
        return None, "", False
    try:
        name, end = json.JSONDecoder().raw_decode(text, len(head))
    except ValueError:
        return None, "", False
    rest = text[end:]
    if not rest.startswith(',"arguments":'):
        return None, "", False
    body = rest[len(',"arguments":') :]
    if body.endswith("}") and _parses(body[:-1]):  # the arguments, then the call's "}"
        return str(name), body[:-1], True
    return str(name), body, False


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def complete(plan: ToolPlan, text: str) -> bool:
    """Whether ``text`` is a whole call."""
    return _split(plan, text)[2]


def tool_calls(plan: ToolPlan, text: str) -> list[dict[str, Any]] | None:
    """OpenAI's ``tool_calls`` for the answer ``text``; None if not even the name came out."""
    name, arguments, _ = _split(plan, text)
    if name is None:
        return None
    return [
        {
            "id": plan.call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
    ]


class ToolCallDeltas:
    """Turns the streamed text of a tool-call answer into OpenAI's tool-call deltas: the call's
    id, type and name once the name is known, then its arguments as they come."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.named = False
        self.sent = 0  # characters of the arguments sent
        self.whole = False
        """The answer so far is a whole call (see :func:`complete`)."""

    def feed(self, chunk: str, *, final: bool = False) -> list[dict[str, Any]]:
        """The deltas that ``chunk`` (more of the answer) makes sendable."""
        self.text += chunk
        name, arguments, whole = _split(self.plan, self.text)
        self.whole = whole
        if name is None:
            return []
        out: list[dict[str, Any]] = []
        if not self.named:
            self.named = True
            out.append(
                {
                    "index": 0,
                    "id": self.plan.call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            )
        # Without a named function the last character may be the call object's closing brace:
        # held back until the answer is complete.
        ready = arguments if final or whole or self.plan.named else arguments[:-1]
        if len(ready) > self.sent:
            out.append({"index": 0, "function": {"arguments": ready[self.sent :]}})
            self.sent = len(ready)
        return out


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def tagged_calls(plan: ToolPlan, text: str) -> tuple[str, list[dict[str, Any]]]:
    """An ``auto`` answer's text before its first ``<tool_call>``, and the calls written in
    those tags as OpenAI's ``tool_calls`` (none when a tag holds no ``{"name", "arguments"}``
    object of a known function: then the whole text is the answer)."""
    head, tag, rest = text.partition(_OPEN)
    if not tag:
        return text, []
    calls = []
    names = {f["name"] for f in plan.tools}
    for i, block in enumerate(rest.split(_OPEN)):
        body = block.partition(_CLOSE)[0]  # a last tag may be cut before its closing one
        try:
            call = json.loads(body)
        except ValueError:
            return text, []
        if not isinstance(call, dict) or call.get("name") not in names:
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append(
            {
                "id": f"{plan.call_id}_{i}" if i else plan.call_id,
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": json.dumps(arguments, separators=(",", ":")),
                },
            }
        )
    return head.strip(), calls


class TaggedCallStream:
    """Streams an ``auto`` answer: text is sent as it comes until a ``<tool_call>`` tag may be
    starting; from there it is held, and at the end turned into tool-call deltas (or sent as
    text if it holds no valid call)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text sent as content

    def feed(self, chunk: str) -> str:
        """The content that may be sent now."""
        self.text += chunk
        start = self.text.find(_OPEN, self.sent)
        if start < 0:  # hold back a tail that could be the start of the tag
            start = len(self.text)
            for k in range(min(len(_OPEN) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(_OPEN[:k]):
                    start = len(self.text) - k
                    break
        out = self.text[self.sent : start]
        self.sent = start
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: the content still to send, and the tool-call deltas (if any)."""
        _, calls = tagged_calls(self.plan, self.text)  # the text before the tags was sent
        if not calls:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return rest, []
        deltas = [{"index": i, **call} for i, call in enumerate(calls)]
        return "", deltas
