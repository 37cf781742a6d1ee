"""The OpenAI request bodies the server accepts, and their translation to a GenerationConfig.

Inside: pydantic models for ``/v1/completions`` and ``/v1/chat/completions`` (strict types:
``"5"`` is not an int), the extension fields (``top_k``, ``min_p``, ``repetition_penalty``,
``priority``, ``ignore_eos``, ``cache_salt``), and :func:`generation_config`.

How fields are read, as OpenAI and vLLM read them:

- ``null`` for an optional field means its default (``"max_tokens": null`` is 16 tokens on
  ``/v1/completions``); a required field (``model``, ``messages``, ``prompt``'s key) must be there.
- Unknown fields, at the top level and inside known objects (``stream_options``, messages), are
  ignored: they cannot change the answer. Known fields that would change the answer but are not
  implemented (``n`` > 1, ``best_of`` > 1, ``suffix``, ``logit_bias``, tools, audio output,
  more than one logprob alternative, a chat completion of 0 tokens) are refused with a 400 that
  names the field, rather than silently ignored.
- ``/v1/completions`` takes ``max_tokens`` 0 (nothing is generated) and ``echo``; with both
  ``echo`` and ``logprobs``, the prompt's tokens are scored too (:func:`generation_config` asks
  for ``prompt_logprobs``).
- The output may be constrained by one of: ``response_format`` (``json_object``,
  ``json_schema``), vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``,
  ``grammar``), or llama.cpp's ``json_schema`` and ``grammar``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from ..errors import InvalidRequest
from ..generation import GenerationConfig
from ..structured import StructuredOutput
from .tools import ToolPlan, plan_tools

__all__ = ["ChatCompletionRequest", "CompletionRequest", "generation_config"]


def _whole_number(value: Any) -> Any:
    """A float with no fractional part as the int it is: JSON Schema counts ``1.0`` as an
    integer, and clients that send numbers as floats should not get a 400 for it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole_number)]
"""An integer field: strict (``"5"`` is refused) but ``5.0`` is 5."""

_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    # field: the values that ask for nothing (accepted); any other value is refused
    "best_of": (None, 0, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),  # on /v1/completions (chat completions serve them)
    "tool_choice": (None, "none", "auto"),  # "auto" with no tools: nothing to call
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "modalities": (None, ["text"]),
}
"""Fields of the OpenAI API that would change the answer but are not implemented here."""


class _Body(BaseModel):
    """A JSON object of the API: strict types, ``null`` for an optional field is its default,
    and a number field refuses ``NaN`` and ``Infinity`` (Python's JSON parser reads them) as not
    numbers, before any range check could call ``NaN`` out of range."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or fields[k].is_required()
        }


class StreamOptions(_Body):
    """``stream_options`` of a streamed request (unknown keys are ignored, as OpenAI does)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage on every chunk
    include_obfuscation: bool = True  # accepted; chunks carry no obfuscation padding


class JsonSchemaFormat(_Body):
    """``response_format.json_schema``: the schema the answer follows. ``strict`` is accepted
    either way: the output always follows the schema (llguidance supports nearly all of JSON
    Schema, so OpenAI's strict-mode subset is not imposed)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = "response"
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Body):
    """``response_format``: ``text`` (the default), ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs`` extension: exactly one of ``json`` (a schema), ``regex``,
    ``choice`` or ``grammar`` (Lark or GBNF)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: Int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0 keeps only the most likely token
    top_k: Int = Field(0, ge=-1)  # extension; 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # extension
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Int | None = None  # any int: OpenAI's seeds are signed 64-bit
    stop: str | list[str] | None = None
    n: Int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension
    json_schema: dict[str, Any] | bool | None = None  # llama.cpp's extension
    grammar: str | None = None  # llama.cpp's extension (GBNF, or Lark)
    priority: Int = Field(0, ge=-1_000_000, le=1_000_000)  # extension: lower is served first
    ignore_eos: bool = False  # extension
    cache_salt: str | None = None  # vLLM's extension: prefixes are shared only within a salt
    user: str | None = None  # accepted, not used

    min_tokens: ClassVar[int] = 1
    """The least completion length served (0 where the prompt alone can be the answer)."""

    def requested_max_tokens(self) -> int | None:
        """The completion length the client asked for, if it did."""
        return self.max_tokens

    def check_supported(self) -> None:
        """Refuse OpenAI parameters this server does not implement."""
        extra = self.model_extra or {}
        for key, accepted in _UNSUPPORTED.items():
            if key in extra and not any(_same(extra[key], a) for a in accepted):
                raise InvalidRequest(f"{key}: not supported by this server")
        if self.n != 1:
            raise InvalidRequest("n: only n=1 is supported")
        requested = self.requested_max_tokens()
        if requested is not None and requested < self.min_tokens:
            raise InvalidRequest(
                f"{self.max_tokens_field()}: must be >= {self.min_tokens}, got {requested}"
            )
        if len(self.stop_strings()) > 16:
            raise InvalidRequest("stop: at most 16 stop strings")

    def structured(self) -> tuple[str, StructuredOutput] | None:
        """The output constraint asked for, and the field that asked (at most one may).

        Raises:
            InvalidRequest: two fields constrain the output, or one is malformed (the message
                starts with the field's name).
        """
        asked: list[tuple[str, Callable[[], StructuredOutput]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", StructuredOutput.json_object))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise InvalidRequest(
                    "response_format: json_schema is required when type is 'json_schema'"
                )
            schema = rf.json_schema.schema_
            asked.append(("response_format", lambda: StructuredOutput.json_schema(schema)))
        so = self.structured_outputs
        if so is not None:
            given: list[tuple[str, Callable[[], StructuredOutput]]] = []
            if so.json_ is not None:
                given.append(("json", partial(StructuredOutput.json_schema, so.json_)))
            if so.regex is not None:
                given.append(("regex", partial(StructuredOutput.regex, so.regex)))
            if so.choice is not None:
                given.append(("choice", partial(StructuredOutput.choice, so.choice)))
            if so.grammar is not None:
                given.append(("grammar", partial(StructuredOutput.grammar, so.grammar)))
            if len(given) != 1:
                raise InvalidRequest(
                    "structured_outputs: give exactly one of json, regex, choice or grammar"
                )
            asked.append((f"structured_outputs.{given[0][0]}", given[0][1]))
        if (js := self.json_schema) is not None:
            asked.append(("json_schema", partial(StructuredOutput.json_schema, js)))
        if (grammar := self.grammar) is not None:
            asked.append(("grammar", partial(StructuredOutput.grammar, grammar)))
        if len(asked) > 1:
            fields = ", ".join(field for field, _ in asked)
            raise InvalidRequest(
                f"{asked[1][0]}: only one field may constrain the output ({fields})"
            )
        if not asked:
            return None
        field, build = asked[0]
        try:
            return field, build()
        except InvalidRequest as exc:
            raise InvalidRequest(f"{field}: {exc}") from None

    def stop_strings(self) -> list[str]:
        """The stop strings asked for; empty ones stop nothing and are left out."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    def max_tokens_field(self) -> str:
        """The name of the field that set the completion length."""
        return "max_tokens"


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions``."""

    # Required, nullable: null is OpenAI's default "<|endoftext|>", an empty document (the BOS).
    prompt: str | list[str] | list[Int] | list[list[Int]] | None
    max_tokens: Int | None = 16  # the OpenAI default for completions
    logprobs: Int | None = Field(None, ge=0)
    echo: bool = False  # the prompt comes first in the text (and in logprobs, scored)
    min_tokens: ClassVar[int] = 0  # with echo, the prompt is the answer

    def prompt_value(self) -> str | list[int]:
        """The one prompt: text or token ids (a list of prompts must hold exactly one)."""
        prompt = self.prompt
        if prompt is None or prompt == []:  # OpenAI's default: the empty document
            return ""
        if isinstance(prompt, list) and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise InvalidRequest("prompt: only one prompt per request is supported")
            return prompt[0] or ""  # [[]] too is the empty document
        return prompt

    def check_supported(self) -> None:
        """As for every request, plus logprob alternatives."""
        super().check_supported()
        if self.logprobs is not None and self.logprobs > 1:
            raise InvalidRequest(
                "logprobs: at most 1 (generated tokens carry the chosen token's logprob only)"
            )

    def prompt_logprobs(self) -> int | None:
        """The alternatives each prompt token is scored with: ``logprobs``, when the prompt is
        echoed with logprobs; None otherwise."""
        return self.logprobs if self.echo else None


class ChatMessage(BaseModel):
    """One chat message (text content only; other keys, such as ``name``, reach the template).
    A plain model, without ``_Body``'s null handling (nothing here has a default to restore):
    a conversation may hold thousands of messages."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class FunctionDef(_Body):
    """A tool's function: its name, what it does, and the JSON schema of its arguments."""

    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    """One entry of ``tools`` (only ``function`` tools are served; others are refused by
    :meth:`ChatCompletionRequest.tool_plan`, naming ``tools``)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    function: FunctionDef | None = None


class ChatCompletionRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None  # checked by tool_plan, naming the field
    parallel_tool_calls: bool | None = None  # accepted: an answer holds at most one call
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``, if given."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_field(self) -> str:
        """``max_completion_tokens`` when given, else ``max_tokens``."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def check_supported(self) -> None:
        """As for every request, plus logprob alternatives."""
        super().check_supported()
        if self.top_logprobs:
            raise InvalidRequest("top_logprobs: alternatives are not available (use 0)")

    def tool_plan(self, *, template_calls: bool = False) -> ToolPlan | None:
        """The tool call this request asks for (None: free text); ``template_calls``: the
        model's chat template renders tools and has calls written in tags.

        Raises:
            InvalidRequest: see :func:`~zigllama_batch.server.tools.plan_tools`; or both a tool
                call and another field constrain the output.
        """
        tools = self.tools or []
        kind = next((t.type for t in tools if t.type != "function" or t.function is None), None)
        if kind is not None:
            raise InvalidRequest(f"tools: only function tools are served, got type {kind!r}")
        plan = plan_tools(
            [t.model_dump(exclude_none=True) for t in tools],
            self.tool_choice,
            template_calls=template_calls,
        )
        if plan is not None and (asked := self.structured()) is not None:
            raise InvalidRequest(f"{asked[0]}: a tool call already constrains the output")
        return plan

    def message_dicts(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for the chat template."""
        return [
            {
                **(m.model_extra or {}),
                "role": m.role,
                "content": m.content if m.content is not None else "",
            }
            for m in self.messages
        ]


def generation_config(
    body: CompletionRequest | ChatCompletionRequest, *, max_tokens_default: int
) -> GenerationConfig:
    """The decoding settings a request body asks for (InvalidRequest names a bad field)."""
    body.check_supported()
    max_tokens = body.requested_max_tokens()
    logprobs = bool(body.logprobs) or (
        isinstance(body, CompletionRequest) and body.logprobs is not None
    )
    return GenerationConfig(
        max_tokens=max_tokens_default if max_tokens is None else max_tokens,
        temperature=body.temperature,
        top_k=max(body.top_k, 0),
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(body.stop_strings()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=body.prompt_logprobs() if isinstance(body, CompletionRequest) else None,
        structured=structured[1] if (structured := body.structured()) is not None else None,
    )


def _same(value: object, accepted: object) -> bool:
    """JSON equality: ``1.0`` is ``1``, but ``True`` is not (a JSON boolean is not a number)."""
    return isinstance(value, bool) == isinstance(accepted, bool) and value == accepted
