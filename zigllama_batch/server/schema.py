"""The OpenAI request bodies the server accepts, and their translation to a GenerationConfig.

Inside: pydantic models for ``/v1/completions`` and ``/v1/chat/completions`` (strict types:
``"5"`` is not an int), the extension fields (``top_k``, ``min_p``, ``repetition_penalty``,
``priority``, ``ignore_eos``), and :func:`generation_config`. Parameters of the OpenAI API this
server does not implement (``n`` > 1, ``best_of``, ``echo``, ``suffix``, ``logit_bias``, tools,
response formats, more than one logprob alternative) are refused with a 400 rather than
silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidRequest
from ..generation import GenerationConfig

__all__ = ["ChatCompletionRequest", "CompletionRequest", "generation_config"]

_UNSUPPORTED = (
    "best_of",
    "suffix",
    "logit_bias",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "prediction",
    "audio",
    "modalities",
)
"""Fields of the OpenAI API that would change the answer but are not implemented here."""


class StreamOptions(BaseModel):
    """``stream_options`` of a streamed request."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    include_obfuscation: bool = True  # accepted; chunks carry no obfuscation padding


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension; 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # extension
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)  # extension
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)  # extension: lower is served first
    ignore_eos: bool = False  # extension
    user: str | None = None  # accepted, not used

    def requested_max_tokens(self) -> int | None:
        """The completion length the client asked for, if it did."""
        return self.max_tokens

    def check_supported(self) -> None:
        """Refuse OpenAI parameters this server does not implement."""
        extra = self.model_extra or {}
        for key in _UNSUPPORTED:
            if extra.get(key) not in (None, [], {}, 1 if key == "best_of" else None):
                raise InvalidRequest(f"{key}: not supported by this server")
        if self.n != 1:
            raise InvalidRequest("n: only n=1 is supported")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise InvalidRequest("stop: at most 16 non-empty strings")


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False

    def prompt_value(self) -> str | list[int]:
        """The one prompt: text or token ids (a list of prompts must hold exactly one)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise InvalidRequest("prompt: only one prompt per request is supported")
            return prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise InvalidRequest("prompt: an empty list is not a prompt")
        return prompt  # type: ignore[return-value]

    def check_supported(self) -> None:
        """As for every request, plus ``echo`` and logprob alternatives."""
        super().check_supported()
        if self.echo:
            raise InvalidRequest("echo: not supported by this server")
        if self.logprobs is not None and self.logprobs > 1:
            raise InvalidRequest("logprobs: only the chosen token's logprob is available (<= 1)")


class ChatMessage(BaseModel):
    """One chat message (text content only)."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``, if given."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def check_supported(self) -> None:
        """As for every request, plus logprob alternatives."""
        super().check_supported()
        if self.top_logprobs:
            raise InvalidRequest("top_logprobs: alternatives are not available (use 0)")

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
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    logprobs = bool(body.logprobs) or (
        isinstance(body, CompletionRequest) and body.logprobs is not None
    )
    return GenerationConfig(
        max_tokens=max_tokens or max_tokens_default,
        temperature=body.temperature,
        top_k=max(body.top_k, 0),
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(stops),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )
