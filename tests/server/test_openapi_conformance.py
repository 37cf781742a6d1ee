"""The app against OpenAI's own OpenAPI description, fuzzed in-process (ASGI) by schemathesis.

The description is OpenAI's, reduced to the operations this server implements (see
``tests/openai_spec.py``: where it comes from, its licence, what is kept). For each operation, schemathesis' engine runs its examples, coverage and
fuzzing phases, with positive (spec-valid) and negative data, against a fresh app over a tiny
model, and checks every answer:

- ``not_a_server_error``: no 5xx, whatever the request;
- ``response_schema_conformance``: a 2xx JSON answer matches the documented response schema;
- ``stream_chunk_conformance`` (here): each event of a 2xx ``text/event-stream`` answer matches
  the chunk schema OpenAI documents, and the stream ends with ``data: [DONE]``;
- ``accepted_unless_refused`` (here): schemathesis' ``positive_data_acceptance`` (a spec-valid
  request gets a 2xx), except for the refusals this server documents (``DOCUMENTED_REFUSALS``,
  and ``RESPONSES_REFUSALS`` for ``POST /responses``).

A ``before_call`` hook sends every request to the served model (the description's examples name
OpenAI's models) and caps the completion length, so the run stays fast. The engine is driven
directly rather than through ``schema.parametrize()`` so that one run reports every distinct
failure (grouped by check, status and error), not just the first one Hypothesis meets.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema_rs  # schemathesis' own JSON Schema validator
import pytest
import schemathesis
from openai_spec import reduced_openai_description
from schemathesis.engine import events
from schemathesis.engine import from_schema as engine_for
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from zigllama_batch import BatchConfig, BatchProcessor, LLaMAModel, PromptTooLong, Tokenizer
from zigllama_batch.server import create_app
from zigllama_batch.server.responses_schema import (
    HONOURED_INCLUDES,
    ResponsesRequest,
    items_to_messages,
)
from zigllama_batch.server.schema import ChatCompletionRequest, CompletionRequest
from zigllama_batch.server.store import StoredResponse

Tiny = tuple[LLaMAModel, Tokenizer]
MODEL = "tiny"
MAX_TOKENS = 3
"""Requested ``max_tokens`` / ``max_completion_tokens`` above this are lowered to it."""

OPERATIONS = [
    "POST /completions",
    "POST /chat/completions",
    "POST /responses",
    "GET /responses/{response_id}",
    "GET /models",
    "GET /models/{model}",
]

CONFIG: dict[str, Any] = {
    # The same cases every run, so a failure in CI is the failure seen locally.
    "generation": {"mode": "all", "deterministic": True, "database": "none"},
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True},
        "fuzzing": {"enabled": True, "generation": {"max-examples": 25}},
        "stateful": {"enabled": False},
    },
    "checks": {
        "enabled": False,  # only these:
        "not_a_server_error": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
        "stream_chunk_conformance": {"enabled": True},
        "accepted_unless_refused": {"enabled": True},
        # Called by accepted_unless_refused, not on its own. A spec-valid request must succeed:
        # the default also lets 404, 409, 429 and 5xx pass, but every request names the served
        # model and nothing else is running.
        "positive_data_acceptance": {"enabled": False, "expected-statuses": ["2xx"]},
    },
    "continue-on-failure": True,  # every case is sent, so every distinct failure is reported
    "output": {"sanitization": {"enabled": False}},  # "max_tokens" is not a secret
}


# -- the refusals this server documents ---------------------------------------------------------


def _set(key: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda body: body.get(key) is not None


def _above(key: str, limit: int) -> Callable[[Mapping[str, Any]], bool]:
    def test(body: Mapping[str, Any]) -> bool:
        value = body.get(key)
        return isinstance(value, int | float) and not isinstance(value, bool) and value > limit

    return test


def _below(key: str, limit: int) -> Callable[[Mapping[str, Any]], bool]:
    def test(body: Mapping[str, Any]) -> bool:
        value = body.get(key)
        return isinstance(value, int | float) and not isinstance(value, bool) and value < limit

    return test


def _chat(test: Callable[[Mapping[str, Any]], bool]) -> Callable[[Mapping[str, Any]], bool]:
    return lambda body: "messages" in body and test(body)


def _non_text_part(body: Mapping[str, Any]) -> bool:
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list) and any(
            not isinstance(part, Mapping) or part.get("type") != "text" for part in content
        ):
            return True
    return False


def _stops(body: Mapping[str, Any]) -> int:
    stop = body.get("stop")
    return 1 if isinstance(stop, str) else len(stop) if isinstance(stop, list) else 0


def _prompts(body: Mapping[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _response_format_not_text(body: Mapping[str, Any]) -> bool:
    response_format = body.get("response_format")
    return isinstance(response_format, Mapping) and response_format.get("type") != "text"


def _token_ids(body: Mapping[str, Any]) -> bool:
    prompt = body.get("prompt")
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)


SERVING: dict[str, BatchProcessor] = {}
"""The processor behind the app under test (the context check tokenizes with its tokenizer)."""


def _over_context(body: Mapping[str, Any]) -> bool:
    """The request really does not fit the served model's context: its prompt's tokens, plus
    the completion length it asks for (a refusal the server makes on a lower bound alone would
    not count)."""
    processor = SERVING["processor"]
    encoded = _encoded(body)
    if encoded is None:  # refused anyway (a non-text part, say): the bound alone may refuse it
        try:
            processor.check_prompt_length(
                body.get("messages", body.get("prompt", body.get("input")))
            )
        except PromptTooLong:
            return True
        return False
    ids, asked = encoded
    room = processor.max_context - len(ids)
    return room <= 0 or (asked is not None and asked > room)


def _encoded(body: Mapping[str, Any]) -> tuple[list[int], int | None] | None:
    """The prompt's token ids and the completion length asked for, as the server reads the
    body; None when the body is not a request the tokenizer takes."""
    tokenizer = SERVING["processor"].tokenizer
    try:
        if "input" in body or "instructions" in body:
            request = ResponsesRequest.model_validate(body)
            messages = items_to_messages(request.input_items(), template_calls=False)
            if request.instructions:
                messages.insert(0, {"role": "system", "content": request.instructions})
            return tokenizer.encode_prompt(messages), request.max_output_tokens
        if "messages" in body:
            chat = ChatCompletionRequest.model_validate(body)
            return tokenizer.encode_prompt(chat.message_dicts()), chat.requested_max_tokens()
        completion = CompletionRequest.model_validate(body)
        return tokenizer.encode_prompt(completion.prompt_value()), completion.requested_max_tokens()
    except Exception:
        return None


def _responses_tools(body: Mapping[str, Any]) -> bool:
    choice = body.get("tool_choice")
    return bool(body.get("tools")) or choice not in (None, "none", "auto")


_SERVED_ITEMS = frozenset({"message", "function_call", "function_call_output"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "refusal"})


def _unserved_items(body: Mapping[str, Any]) -> bool:
    """Input items other than messages of text parts, function calls and their outputs."""
    items = body.get("input")
    if not isinstance(items, list):
        return False
    for item in items:
        if not isinstance(item, Mapping):
            return True
        kind = item.get("type", "message" if "role" in item else None)
        if kind not in _SERVED_ITEMS:
            return True
        content = item.get("content", item.get("output"))
        if kind == "message" and item.get("role") not in (
            "user",
            "assistant",
            "system",
            "developer",
        ):
            return True
        if isinstance(content, list) and any(
            not isinstance(part, Mapping) or part.get("type") not in _TEXT_PARTS for part in content
        ):
            return True
    return False


def _includes_unserved(body: Mapping[str, Any]) -> bool:
    include = body.get("include")
    return isinstance(include, list) and any(
        not isinstance(v, str) or v not in HONOURED_INCLUDES for v in include
    )


def _reasoning(key: str, allowed: tuple[object, ...]) -> Callable[[Mapping[str, Any]], bool]:
    def test(body: Mapping[str, Any]) -> bool:
        reasoning = body.get("reasoning")
        return isinstance(reasoning, Mapping) and reasoning.get(key) not in allowed

    return test


def _text(key: str, refused: Callable[[object], bool]) -> Callable[[Mapping[str, Any]], bool]:
    def test(body: Mapping[str, Any]) -> bool:
        text = body.get("text")
        return isinstance(text, Mapping) and refused(text.get(key))

    return test


@dataclass(frozen=True)
class Refusal:
    """A 400 the server answers on purpose: ``applies`` says the request asked for it, and the
    error's ``param`` (matching ``param`` as a regex; with its ``code``, or its ``message``
    matching a regex, where given) says the answer is that refusal."""

    param: str | None
    applies: Callable[[Mapping[str, Any]], bool]
    message: str = ""
    code: str | None = None


DOCUMENTED_REFUSALS = [
    # More than one choice per request.
    Refusal("n", _above("n", 1)),
    Refusal("best_of", _above("best_of", 1)),
    # Parameters that would change the answer but are not implemented (any non-null value).
    Refusal("suffix", _set("suffix")),
    Refusal("logit_bias", _set("logit_bias")),
    # Tools: function tools with tool_choice "required" or a named function are served; other
    # tool types, and choices that need the model to decide ("auto") or name nothing, are not.
    Refusal("tools", _set("tools")),
    Refusal("tool_choice", lambda body: bool(body.get("tools")) or _set("tool_choice")(body)),
    Refusal("functions", _set("functions")),
    Refusal("function_call", _set("function_call")),
    Refusal("audio", _set("audio")),
    Refusal("modalities", _set("modalities")),
    # A chat completion of nothing (a completion of 0 tokens is served: the prompt, with echo).
    Refusal("max_tokens", _chat(_below("max_tokens", 1)), message="must be >= 1"),
    Refusal("max_completion_tokens", _below("max_completion_tokens", 1), message="must be >= 1"),
    # Structured output: a schema llguidance cannot compile, or a second constraint (tools).
    Refusal("response_format", _response_format_not_text),
    # Generated tokens carry the chosen token's logprob only, no alternatives.
    Refusal("logprobs", _above("logprobs", 1)),  # completions: an int
    Refusal("top_logprobs", _above("top_logprobs", 0)),
    # At most 16 stop strings (OpenAI allows 4, so no spec-valid request meets this one).
    Refusal("stop", lambda body: _stops(body) > 16),
    # Chat content parts other than text (images, audio, files, refusals).
    Refusal(None, _non_text_part, message=r"^messages\[\d+\]\.content: only text parts"),
    # One prompt per completion request.
    Refusal("prompt", lambda body: _prompts(body) > 1),
    # Limits of the model rather than of the API (OpenAI answers them with a 400 too): a prompt
    # and completion longer than the context, and token ids outside the vocabulary.
    Refusal("prompt", _over_context, code="context_length_exceeded"),
    Refusal("messages", _over_context, code="context_length_exceeded"),
    Refusal("max_tokens", _over_context, code="context_length_exceeded"),
    Refusal("max_completion_tokens", _over_context, code="context_length_exceeded"),
    Refusal("prompt", _token_ids, message=r"^prompt: token id -?\d+ is outside the vocabulary"),
]


RESPONSES_REFUSALS = [
    # /responses: an input to answer (or a stored conversation, which no fuzzed request names).
    Refusal("input", lambda body: not body.get("input")),
    # Input items other than messages of text, function calls and their outputs.
    Refusal(r"input\[\d+\](\.\w+(\[\d+\]\.\w+)?)?", _unserved_items),
    Refusal("input", _over_context, code="context_length_exceeded"),
    Refusal("max_output_tokens", _over_context, code="context_length_exceeded"),
    # Tools: function tools with tool_choice required or a named function (the tiny model's
    # template renders no tools, so auto is refused); built-in tools are not served.
    Refusal(r"tools(\[\d+\]\.(type|name|parameters))?|tool_choice", _responses_tools),
    Refusal("text.format", lambda body: _responses_tools(body) and _set("text")(body)),
    Refusal(
        "max_tool_calls", lambda body: _responses_tools(body) and _below("max_tool_calls", 1)(body)
    ),
    # Structured output: a schema llguidance cannot compile.
    Refusal(
        "text.format",
        _text("format", lambda f: isinstance(f, Mapping) and f.get("type") == "json_schema"),
    ),
    Refusal("text.verbosity", _text("verbosity", lambda v: v not in (None, "medium"))),
    # What OpenAI runs on its side, or that this server does not implement.
    Refusal("background", lambda body: body.get("background") is True),
    Refusal("reasoning.effort", _reasoning("effort", (None, "none"))),
    Refusal("reasoning.summary", _reasoning("summary", (None,))),
    Refusal("reasoning.summary", _reasoning("generate_summary", (None,))),
    Refusal(r"include\[\d+\]", _includes_unserved),
    Refusal("conversation", _set("conversation")),
    Refusal("prompt", _set("prompt")),  # a stored prompt template
    Refusal("context_management", _set("context_management")),
    Refusal("truncation", lambda body: body.get("truncation") == "auto"),
    Refusal("top_logprobs", _above("top_logprobs", 0)),  # only the chosen token's logprob
]
"""The refusals of ``POST /responses``."""


def documented_refusal(body: object, answer: object, path: str) -> Refusal | None:
    """The documented refusal a 400 answer (in OpenAI's error shape) is, if it is one."""
    if not isinstance(body, Mapping) or not isinstance(answer, Mapping):
        return None
    error = answer.get("error")
    if not isinstance(error, Mapping) or set(error) != {"message", "type", "param", "code"}:
        return None
    if error["type"] != "invalid_request_error":
        return None
    for refusal in RESPONSES_REFUSALS if path == "/responses" else DOCUMENTED_REFUSALS:
        param = error["param"]
        if refusal.param is None and param is not None:
            continue
        if refusal.param is not None and not re.fullmatch(refusal.param, str(param)):
            continue
        if not refusal.applies(body):
            continue
        if refusal.code is not None and refusal.code != error["code"]:
            continue
        if refusal.message and not re.search(refusal.message, str(error["message"])):
            continue
        return refusal
    return None


# -- checks (registered with schemathesis, enabled by CONFIG) ---------------------------------


@schemathesis.check
def accepted_unless_refused(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance``, letting the documented refusals through."""
    if response.status_code == 400:
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if documented_refusal(case.body, answer, case.operation.path) is not None:
            return None
    return positive_data_acceptance(ctx, response, case)


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI's ``nullable: true`` as JSON Schema spells it (schemathesis reads it so too)."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_to_json_schema(v) for k, v in node.items() if k != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") is True else out


@functools.cache
def chunk_validators() -> dict[str, jsonschema_rs.Draft202012Validator]:
    """A validator of one streamed event per operation path (a response's events are
    ``ResponseStreamEvent``s). OpenAI documents a completion's chunks as completion objects; like a chat chunk's (and like OpenAI's own streams), their
    ``finish_reason`` is null until the last one."""
    spec = with_echo_nulls(reduced_openai_description())
    components = _nullable_to_json_schema(spec["components"])
    completion = components["schemas"]["CreateCompletionResponse"]
    choice = completion["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}

    def of(name: str) -> jsonschema_rs.Draft202012Validator:
        root = {"$ref": f"#/components/schemas/{name}", "components": components}
        return jsonschema_rs.Draft202012Validator(root)

    return {
        "/chat/completions": of("CreateChatCompletionStreamResponse"),
        "/completions": of("CreateCompletionResponse"),
        "/responses": of("ResponseStreamEvent"),
    }


def with_echo_nulls(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with a completion's ``token_logprobs`` and ``top_logprobs`` items nullable. The
    description says numbers and objects, but OpenAI's API (and vLLM's) answer null for the
    first prompt token of an ``echo`` with ``logprobs``, which has nothing before it; clients
    such as lm-evaluation-harness read that shape."""
    spec = copy.deepcopy(spec)
    choice = spec["components"]["schemas"]["CreateCompletionResponse"]["properties"]["choices"]
    logprobs = choice["items"]["properties"]["logprobs"]["anyOf"][0]["properties"]
    for key in ("token_logprobs", "top_logprobs"):
        logprobs[key]["items"] = {"anyOf": [logprobs[key]["items"], {"type": "null"}]}
    return spec


def without_event_streams(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without its ``text/event-stream`` responses. OpenAI gives the chunk schema there,
    meaning each event's ``data``; schemathesis reads it as OpenAPI 3.2 does, as the schema of
    the event object (``{"data": "...", "event": ...}``), and would report every stream.
    ``stream_chunk_conformance`` checks the chunks instead."""
    spec = copy.deepcopy(spec)
    for item in spec["paths"].values():
        for operation in item.values():
            for response in operation.get("responses", {}).values():
                response.get("content", {}).pop("text/event-stream", None)
    return spec


RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


@schemathesis.check
def stream_chunk_conformance(ctx: Any, response: Any, case: Any) -> bool | None:
    """Each ``data:`` event of a 2xx event stream matches the chunk schema, and the stream ends
    with ``data: [DONE]`` (a response's with its completed, incomplete or failed event)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    validator = chunk_validators().get(case.operation.path)
    if not 200 <= response.status_code < 300 or validator is None:
        return None
    if not content_type.startswith("text/event-stream") or response.stream_cut_short:
        return None
    data = [
        line[len("data:") :].strip()
        for line in response.text.splitlines()
        if line.startswith("data:")
    ]
    problems = []
    if case.operation.path == "/responses":  # no [DONE]: the last event is the response's
        if not data or json.loads(data[-1]).get("type") not in RESPONSE_ENDS:
            problems.append("the stream does not end with the response's last event")
    elif not data or data[-1] != "[DONE]":
        problems.append("the stream does not end with `data: [DONE]`")
    for n, event in enumerate(d for d in data if d != "[DONE]"):
        try:
            chunk = json.loads(event)
        except ValueError:
            problems.append(f"event {n} is not JSON: {event[:200]}")
            continue
        error = next(iter(validator.iter_errors(chunk)), None)
        if error is not None:
            where = "/".join(map(str, error.instance_path)) or "(root)"
            problems.append(f"event {n} at {where}: {error.message}")
    if problems:
        raise AssertionError("\n".join(problems))
    return None


# -- the hook ---------------------------------------------------------------------------------


def to_served_model(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Name the served model (in the body, and in the path of ``GET /models/{model}``) and cap
    the completion length, asking for ``MAX_TOKENS`` where the request leaves it open (the
    default is the rest of the context). A ``previous_response_id`` is left out, and
    ``GET /responses/{response_id}`` asks for the one stored response. Values that are not what
    the description allows (a negative case) are left alone."""
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL
        keys = ("max_tokens", "max_completion_tokens", "max_output_tokens")
        for key in keys:
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if all(key not in body for key in keys):
            key = "max_tokens" if "prompt" in body else "max_completion_tokens"
            body[key if "prompt" in body or "messages" in body else "max_output_tokens"] = (
                MAX_TOKENS
            )
        if isinstance(body.get("previous_response_id"), str):
            body.pop("previous_response_id")  # no stored response has the id it makes up
    if isinstance(case.path_parameters, dict):
        if "model" in case.path_parameters:
            case.path_parameters["model"] = MODEL
        if "response_id" in case.path_parameters:
            case.path_parameters["response_id"] = STORED_ID
            # Stored again each time: schemathesis' coverage phase also tries other methods on
            # the path, and DELETE forgets it.
            STORED["store"].put(STORED_ID, STORED["entry"])


# -- findings ---------------------------------------------------------------------------------


@dataclass
class Finding:
    """Failing cases of one kind: the shortest request stands for all of them."""

    check: str
    status: int | None
    what: str
    request: str = ""
    response: str = ""
    count: int = 0
    phases: set[str] = field(default_factory=set)

    def add(self, request: str, response: str, phase: str) -> None:
        self.count += 1
        self.phases.add(phase)
        if not self.request or len(request) < len(self.request):
            self.request, self.response = request, response

    def __str__(self) -> str:
        return (
            f"[{self.check}] {self.status}: {self.what}\n"
            f"    {self.count} case(s), phases: {', '.join(sorted(self.phases))}\n"
            f"    request:  {self.request}\n"
            f"    response: {self.response}"
        )


def _shape(text: str) -> str:
    """A message without its values, so failures of one kind group together."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    return re.sub(r"\d+", "N", text)


def _kind(check: str, failure: Any, body: bytes) -> str:
    """What a failure is about: the error's param and message for a refused request or a server
    error, where in the answer and what for a schema mismatch."""
    if check in ("accepted_unless_refused", "not_a_server_error"):
        try:
            error = json.loads(body)["error"]
            return f"param={error['param']}: {_shape(str(error['message']))}"
        except (ValueError, KeyError, TypeError):
            return _shape(body.decode("utf-8", "replace")[:120])
    lines = [line.strip() for line in str(failure.message).splitlines() if line.strip()]
    # Without the instance jsonschema puts first ("{...} is not valid under any of ...").
    first = re.sub(r"^[\[{].*?(?= (is|does) )", "…", lines[0] if lines else failure.title)
    path = getattr(failure, "instance_path", None)
    where = f"at /{'/'.join(map(str, path))}: " if path is not None else ""
    return where + _shape(first)


def collect(stream: Any) -> tuple[dict[tuple[str, ...], Finding], list[str], int]:
    """The engine's findings, grouped; its errors; the number of cases sent."""
    findings: dict[tuple[str, ...], Finding] = {}
    errors: list[str] = []
    sent = 0
    for event in stream:
        if isinstance(event, events.NonFatalError | events.FatalError):
            # The traceback: an error is most often in this module's own checks or hooks.
            error = getattr(event, "value", None)
            shown = "".join(traceback.format_exception(error)) if error is not None else ""
            errors.append(f"{type(event).__name__}: {shown or event!r}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        sent += len(recorder.interactions)
        for case_id, checks in recorder.checks.items():
            interaction = recorder.interactions.get(case_id)
            request = response = ""
            status: int | None = None
            body = b""
            if interaction is not None:
                sent_body = interaction.request.body or b""
                request = f"{interaction.request.method} {interaction.request.uri} "
                request += sent_body.decode("utf-8", "replace")
                if interaction.response is not None:
                    status = interaction.response.status_code
                    body = interaction.response.content or b""
                    response = body.decode("utf-8", "replace")[:400]
            for check in checks:
                if check.failure_info is None:
                    continue
                failure = check.failure_info.failure
                what = _kind(check.name, failure, body)
                key = (recorder.label, check.name, str(status), what)
                finding = findings.setdefault(key, Finding(check.name, status, what))
                shown = response
                if check.name not in ("accepted_unless_refused", "not_a_server_error"):
                    shown = str(failure.message).split("\n\n")[0][:300] + "\n      " + response
                finding.add(request, shown, event.phase.value)
    return findings, errors, sent


# -- the test ---------------------------------------------------------------------------------


def served_app(tiny: Tiny) -> Any:
    """The app over the tiny model, with one stored response. Schemathesis' engine starts its
    lifespan, and so the processor, on its own event-loop thread; continuous batching: no wait
    for a batch to fill."""
    processor = BatchProcessor(*tiny, BatchConfig(strategy="continuous", max_batch_size=4))
    SERVING["processor"] = processor
    app = create_app(processor, model_name=MODEL, manage_processor=True, drain_timeout=5)
    STORED["store"], STORED["entry"] = app.state.responses, stored_response(tiny)
    return app


STORED_ID = "resp_stored"
"""The id ``GET /responses/{response_id}`` asks for."""
STORED: dict[str, Any] = {}
"""The app's response store, and the response stored under :data:`STORED_ID`."""


def stored_response(tiny: Tiny) -> StoredResponse:
    """A response the server answered and stored (by another app: the one under test starts
    its processor on schemathesis' thread), under :data:`STORED_ID`."""

    async def answer() -> StoredResponse:
        async with BatchProcessor(*tiny, BatchConfig(max_batch_size=1)) as processor:
            app = create_app(processor, model_name=MODEL)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                body = {"model": MODEL, "input": "hi", "max_output_tokens": MAX_TOKENS}
                r = await client.post("/v1/responses", json=body)
            stored = app.state.responses.get(r.json()["id"])
            assert stored is not None
            return StoredResponse({**stored.response, "id": STORED_ID}, stored.items)

    return asyncio.run(answer())


@pytest.mark.parametrize("operation", OPERATIONS)
def test_openai_conformance(tiny: Tiny, operation: str) -> None:
    """Every request schemathesis derives from OpenAI's description of ``operation`` is answered
    as described (or refused as documented)."""
    method, path = operation.split(" ")
    config = schemathesis.Config.from_dict(CONFIG)
    schema = schemathesis.openapi.from_dict(
        without_event_streams(with_echo_nulls(reduced_openai_description())), config=config
    )
    schema = schema.include(method=method, path=path)
    schema.app = served_app(tiny)
    schemathesis.hook("before_call")(to_served_model)  # a global-only hook: removed below
    try:
        findings, errors, sent = collect(engine_for(schema).execute())
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(to_served_model)
        asgi.shutdown_lifespans()  # drains and stops the processor
    assert sent > 0
    assert not errors, "\n".join(errors)
    if findings:
        report = "\n".join(map(str, sorted(findings.values(), key=lambda f: (f.check, f.what))))
        pytest.fail(f"{operation}: {len(findings)} distinct failure(s)\n{report}", pytrace=False)
