"""Tool calls on structured output: ``tools`` with ``tool_choice`` ``"required"`` or a named
function constrain the answer to a call, returned as OpenAI's ``message.tool_calls``.

Inside: :func:`plan_tools` (what a chat request's ``tools`` and ``tool_choice`` ask for, as a
:class:`ToolPlan` holding the constraint), :func:`with_tools` (the tool definitions put before
the conversation), :func:`tool_calls` (the answer's text as OpenAI's ``tool_calls``) and
:class:`ToolCallDeltas` (the same, streamed as OpenAI streams tool-call deltas).

The constrained text is JSON: for a named function, its arguments (valid against the function's
``parameters``); for ``"required"``, ``{"name": ..., "arguments": ...}`` with the name one of the
tools' and the arguments valid against that tool's parameters. One call per answer.

Left out: ``tool_choice="auto"``, which needs the model to decide between text and a call in a
format its chat template defines (and a parser for that format); the default model's template
does not render tools, so it is refused with a 400 saying so. Tools reach the model as a system
message listing them, since no template served here renders them.
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

__all__ = ["ToolCallDeltas", "ToolPlan", "plan_tools", "tool_calls", "with_tools"]

_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """A request's tool call: the function when named (else one of ``tools``), and the
    constraint its answer follows."""

    tools: tuple[dict[str, Any], ...]  # OpenAI's function objects: name, description, parameters
    named: str | None
    structured: StructuredOutput
    call_id: str


def plan_tools(tools: Sequence[dict[str, Any]] | None, tool_choice: object) -> ToolPlan | None:
    """What ``tools`` and ``tool_choice`` ask for; None when the answer is free text.

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
    if choice == "auto":
        raise InvalidRequest(
            "tool_choice: 'auto' needs a model whose chat template renders tools and says how "
            "it calls one; this model's does not. Use 'required' or name a function."
        )
    call_id = f"call_{uuid.uuid4().hex[:24]}"
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
        return ToolPlan(tuple(functions), None, StructuredOutput.json_schema(schema), call_id)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    chosen = next((f for f in functions if f["name"] == name), None)
    if chosen is None:
        raise InvalidRequest(f"tool_choice: no tool named {name!r} in tools ({', '.join(names)})")
    structured = StructuredOutput.json_schema(chosen["parameters"])
    return ToolPlan((chosen,), name, structured, call_id)


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

    def feed(self, chunk: str, *, final: bool = False) -> list[dict[str, Any]]:
        """The deltas that ``chunk`` (more of the answer) makes sendable."""
        self.text += chunk
        name, arguments, whole = _split(self.plan, self.text)
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
