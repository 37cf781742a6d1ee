"""``POST /tokenize`` and ``POST /detokenize``, with vLLM's field names.

Inside: :class:`Tokenization`, the two handlers. ``/tokenize`` takes ``{"prompt": str}`` (with
``add_special_tokens``, default true: the BOS the model's metadata asks for) or
``{"messages": [...]}`` (rendered with the chat template; ``add_generation_prompt`` default
true, ``add_special_tokens`` default false, since the template writes its own) and answers
``{"tokens": [...], "count": n, "max_model_len": ...}``; ``/detokenize`` takes
``{"tokens": [...]}`` and answers ``{"prompt": str}``. Neither runs the model, and neither is
counted as a generation request. Left out: vLLM's ``return_token_strs`` and ``tools``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..errors import InvalidRequest
from .core import Core
from .errors import JSON, ApiError, api_error, validation_error
from .schema import ChatMessage, Int, _Body

__all__ = ["DetokenizeRequest", "Tokenization", "TokenizeRequest"]


class TokenizeRequest(_Body):
    """Body of ``POST /tokenize``: exactly one of ``prompt`` and ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_prompt(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    """Body of ``POST /detokenize``."""

    model: str | None = None
    tokens: list[Int]


class Tokenization:
    """The handlers of ``/tokenize`` and ``/detokenize``."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def tokenize(self, request: Request) -> Response:
        """Token ids of a prompt or a conversation, as the model would read them."""
        try:
            body = await self._parse(request, TokenizeRequest)
            assert isinstance(body, TokenizeRequest)
            tokenizer = self.core.processor.tokenizer
            self.core.processor.check_prompt_length(body.prompt)
            if body.messages is not None:
                messages = [
                    {**(m.model_extra or {}), "role": m.role, "content": m.content or ""}
                    for m in body.messages
                ]
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=body.add_generation_prompt
                )
                tokens = tokenizer.encode(
                    _text(text, "messages"), add_bos=bool(body.add_special_tokens)
                )
            else:
                assert body.prompt is not None
                add = True if body.add_special_tokens is None else body.add_special_tokens
                tokens = tokenizer.encode(
                    _text(body.prompt, "prompt"), add_bos=None if add else False
                )
        except ClientDisconnect:
            return Response(status_code=499)
        except ApiError as exc:
            return exc.response()
        except InvalidRequest as exc:
            return api_error(exc, prompt_param="prompt").response()
        return JSON(
            {
                "tokens": tokens,
                "count": len(tokens),
                "max_model_len": self.core.processor.max_context,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        """The text of token ids (control tokens left out)."""
        try:
            body = await self._parse(request, DetokenizeRequest)
            assert isinstance(body, DetokenizeRequest)
            tokenizer = self.core.processor.tokenizer
            bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise ApiError(
                    400,
                    f"tokens: token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})",
                    param="tokens",
                )
            text = tokenizer.decode(body.tokens)
        except ClientDisconnect:
            return Response(status_code=499)
        except ApiError as exc:
            return exc.response()
        return JSON({"prompt": text})

    async def _parse(self, request: Request, schema: type[_Body]) -> _Body:
        data = await self.core.read_json(request)
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from exc
        model: Any = getattr(body, "model", None)
        if model is not None and model != self.core.model_name:
            raise self.core.not_served(model, param="model")
        return body


def _text(text: str, field: str) -> str:
    """``text``, refused if UTF-8 cannot encode it (a lone surrogate from JSON's escapes)."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise ApiError(
            400, f"{field}: holds a lone surrogate, not valid text", param=field
        ) from exc
    return text
