"""The body of ``POST /v1/responses`` and its translation to chat messages and decoding settings.

Inside: :class:`ResponsesRequest` (pydantic, strict types, ``null`` is a field's default, unknown
fields ignored, as for the other endpoints), :func:`items_to_messages` (OpenAI's input items as
the chat messages a template renders), and :meth:`ResponsesRequest.tool_plan` (the flat
Responses tool shape on :func:`~zigllama_batch.server.tools.plan_tools`).

Served: ``input`` as a string or a list of items (messages whose content is text or
``input_text``/``output_text`` parts, ``function_call`` and ``function_call_output`` items),
``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``, ``text.format``
(``text``, ``json_object``, ``json_schema``), function ``tools`` with ``tool_choice``,
``stream``, ``store`` with ``previous_response_id``, ``include`` of
``message.output_text.logprobs`` (the chosen tokens') and ``reasoning.encrypted_content`` (there
is no reasoning to include), and the extensions ``top_k``, ``min_p``, ``seed``, ``stop``,
``repetition_penalty``, ``priority``, ``ignore_eos``, ``cache_salt``. Refused with a 400 naming
the field, rather than silently ignored: built-in tools, ``background``, ``reasoning`` effort
other than ``none``, a reasoning summary, other ``include`` values, ``top_logprobs`` > 0,
``conversation``, ``prompt`` templates, ``context_management``, ``truncation: auto``, a
``text.verbosity`` other than ``medium``, and input items other than those above (images,
files, item references, other tools' calls).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, Field

from ..errors import InvalidRequest
from ..generation import GenerationConfig
from ..structured import StructuredOutput
from .schema import Int, JsonSchemaFormat, _Body
from .tools import ToolPlan, plan_tools

__all__ = ["HONOURED_INCLUDES", "ResponsesRequest", "TextParam", "items_to_messages"]

HONOURED_INCLUDES = frozenset({"message.output_text.logprobs", "reasoning.encrypted_content"})
"""``include`` values served (a model here never reasons, so there is nothing to encrypt)."""

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


class TextFormat(JsonSchemaFormat):
    """``text.format``: ``text`` (the default), ``json_object`` or ``json_schema`` (whose name,
    schema and strict sit beside the type, unlike chat completions' ``response_format``)."""

    type: Literal["text", "json_object", "json_schema"]


class TextParam(_Body):
    """``text``: the answer's format, and its verbosity (only ``medium`` is served)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(_Body):
    """``reasoning``: only ``effort: none`` (or null) is served; these models do not reason."""

    model_config = ConfigDict(extra="ignore", strict=True)
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(_Body):
    """Body of ``POST /v1/responses``."""

    model: str | None = None  # optional: the served model
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: Int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1)  # extension; 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # extension
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension
    seed: Int | None = None  # extension
    stop: str | list[str] | None = None  # extension, as on chat completions
    text: TextParam | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # accepted: an answer holds at most one constrained call
    max_tool_calls: Int | None = None
    stream: bool = False
    store: bool = True
    include: list[str] | None = None
    reasoning: Reasoning | None = None
    background: bool = False
    truncation: str | None = None
    top_logprobs: Int | None = None
    metadata: dict[str, str] | None = None  # echoed back
    user: str | None = None  # accepted, not used
    priority: Int = Field(0, ge=-1_000_000, le=1_000_000)  # extension: lower is served first
    ignore_eos: bool = False  # extension
    cache_salt: str | None = None  # extension: prefixes are shared only within a salt

    def check_supported(self) -> None:
        """Refuse what this server does not implement, naming the field."""
        if self.input is None and self.previous_response_id is None:
            raise InvalidRequest("input: required (a string or a list of input items)")
        if self.background:
            raise InvalidRequest("background: not supported by this server (answers are direct)")
        extra = self.model_extra or {}
        for key in ("conversation", "prompt", "context_management"):
            if extra.get(key) is not None:
                raise InvalidRequest(f"{key}: not supported by this server")
        if self.reasoning is not None:
            if self.reasoning.effort not in (None, "none"):
                raise InvalidRequest(
                    "reasoning.effort: this model does not reason; use 'none' or leave it out"
                )
            if self.reasoning.summary is not None or self.reasoning.generate_summary is not None:
                raise InvalidRequest("reasoning.summary: this model does not reason")
        for i, value in enumerate(self.include or ()):
            if value not in HONOURED_INCLUDES:
                raise InvalidRequest(
                    f"include[{i}]: {value!r:.80} cannot be included here (served: "
                    f"{', '.join(sorted(HONOURED_INCLUDES))})"
                )
        if self.truncation not in (None, "disabled"):
            raise InvalidRequest("truncation: only 'disabled' is served")
        if self.top_logprobs:
            raise InvalidRequest("top_logprobs: alternatives are not available (use 0)")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise InvalidRequest("text.verbosity: only 'medium' is served")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise InvalidRequest(f"max_output_tokens: must be >= 1, got {self.max_output_tokens}")
        if len(self.stop_strings()) > 16:
            raise InvalidRequest("stop: at most 16 stop strings")
        if self.max_tool_calls is not None and self.max_tool_calls < 1 and self.tools:
            raise InvalidRequest("max_tool_calls: must be >= 1 when tools are given")

    def stop_strings(self) -> list[str]:
        """The stop strings asked for; empty ones stop nothing and are left out."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def logprobs(self) -> bool:
        """The chosen tokens' logprobs are asked for."""
        return "message.output_text.logprobs" in (self.include or ())

    def structured(self) -> StructuredOutput | None:
        """The constraint ``text.format`` asks for (None: free text)."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        try:
            if fmt.type == "json_object":
                return StructuredOutput.json_object()
            return StructuredOutput.json_schema(fmt.schema_)
        except InvalidRequest as exc:
            raise InvalidRequest(f"text.format: {exc}") from None

    def tool_plan(self, *, template_calls: bool) -> ToolPlan | None:
        """The tool call this request asks for (None: free text).

        Raises:
            InvalidRequest: a tool other than a function, a ``tool_choice`` not served (see
                :func:`~zigllama_batch.server.tools.plan_tools`), or both a tool call and
                ``text.format`` constraining the output.
        """
        functions = []
        for i, tool in enumerate(self.tools or ()):
            kind = tool.get("type")
            if kind != "function":
                raise InvalidRequest(
                    f"tools[{i}].type: only function tools are served, got {kind!r:.60} "
                    "(built-in tools run on OpenAI's side)"
                )
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"tools[{i}].name: a function tool needs a name")
            function = {"name": name}
            for key in ("description", "parameters", "strict"):
                if tool.get(key) is not None:
                    function[key] = tool[key]
            functions.append({"type": "function", "function": function})
        choice: object = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function":
                raise InvalidRequest(
                    f"tool_choice: {choice.get('type')!r:.60} is not served; use 'none', "
                    '\'auto\', \'required\' or {"type": "function", "name": ...}'
                )
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        plan = plan_tools(functions, choice, template_calls=template_calls)
        if plan is not None and self.structured() is not None:
            raise InvalidRequest("text.format: a tool call already constrains the output")
        return plan

    def generation_config(self, *, max_tokens: int) -> GenerationConfig:
        """The decoding settings asked for (``max_tokens``: the completion length)."""
        return GenerationConfig(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop_strings()),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
            structured=self.structured(),
        )

    def input_items(self) -> list[dict[str, Any]]:
        """``input`` as items (a string is one user message)."""
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return list(self.input)


def items_to_messages(
    items: list[dict[str, Any]], *, template_calls: bool, field: str = "input"
) -> list[dict[str, Any]]:
    """Input (or earlier output) items as chat messages.

    A function call becomes an assistant message: with ``template_calls`` (the template renders
    ``tool_calls``) as OpenAI's ``tool_calls``, else as the ``{"name", "arguments"}`` JSON the
    model was asked to write. A call's output becomes a ``tool`` message.

    Raises:
        InvalidRequest: an item of a type not served, or malformed (named as ``input[i]...``).
    """
    messages = []
    for i, item in enumerate(items):
        at = f"{field}[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(
                    f"{at}.role: must be 'user', 'assistant', 'system' or 'developer'"
                )
            messages.append({"role": role, "content": _text(item.get("content"), f"{at}.content")})
        elif kind == "function_call":
            call_id, name = _string(item, "call_id", at), _string(item, "name", at)
            arguments = _string(item, "arguments", at)
            if template_calls:
                try:
                    parsed: Any = json.loads(arguments)
                except ValueError:
                    parsed = arguments
                call = {"id": call_id, "type": "function"}
                call["function"] = {"name": name, "arguments": parsed}  # type: ignore[assignment]
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                content = f'{{"name":{json.dumps(name)},"arguments":{arguments}}}'
                messages.append({"role": "assistant", "content": content})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", at)
            output = _text(item.get("output"), f"{at}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        else:
            raise InvalidRequest(
                f"{at}.type: {kind!r:.60} items are not served (messages, function_call and "
                "function_call_output are)"
            )
    return messages


def _string(item: dict[str, Any], key: str, at: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{at}.{key}: must be a string")
    return value


def _text(content: object, at: str) -> str:
    """A message's content as one text: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{at}: must be a string or a list of input_text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            continue
        if kind not in _TEXT_PARTS:
            raise InvalidRequest(
                f"{at}[{j}].type: only text parts are served (input_text, output_text), "
                f"got {kind!r:.60}"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{at}[{j}].text: must be a string")
        texts.append(text)
    return "".join(texts)
