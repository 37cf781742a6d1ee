"""Prompt checks shared by everything that takes requests: the processor, and a front that
tokenizes for processors elsewhere (the Ray Serve ingress).

Inside: :func:`encode_prompt` (a prompt to the token ids it runs as, refused when it leaves no
room to generate) and :func:`check_prompt_length` (a cheap lower bound on a raw prompt's tokens,
to refuse a hopeless prompt before rendering or validating it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from ..engine.tokenizer import Tokenizer
from ..errors import InvalidRequest, PromptTooLong
from ..generation import Prompt

__all__ = ["check_prompt_length", "encode_prompt"]


def encode_prompt(
    tokenizer: Tokenizer,
    max_context: int,
    prompt: Prompt,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """The token ids ``prompt`` runs as in a context of ``max_context`` positions.

    Raises:
        PromptTooLong: the prompt leaves no room in the context for a generated token.
        InvalidRequest: the prompt is malformed.
    """
    check_prompt_length(tokenizer, max_context, prompt)
    prompt_ids = tokenizer.encode_prompt(prompt, tools=tools)
    if len(prompt_ids) >= max_context:
        raise PromptTooLong(len(prompt_ids), max_context)
    return prompt_ids


def check_prompt_length(tokenizer: Tokenizer, max_context: int, prompt: object) -> None:
    """Refuse a prompt certainly too long for ``max_context`` positions, from its shape and
    sizes alone (see :meth:`BatchProcessor.check_prompt_length
    <zigllama_batch.BatchProcessor.check_prompt_length>`).

    Raises:
        PromptTooLong: the prompt cannot fit, whatever its tokens turn out to be.
        InvalidRequest: more chat messages than the context has positions.
    """
    at_least = _least_tokens(prompt, tokenizer)
    if at_least >= max_context:
        raise PromptTooLong(at_least, max_context, at_least=True)
    if _is_chat(prompt) and len(prompt) > max_context:  # roles the template renders empty
        raise InvalidRequest(
            f"messages: {len(prompt)} messages; at most {max_context} (the context's "
            "positions) are accepted"
        )


def _least_tokens(prompt: object, tokenizer: Tokenizer) -> int:
    """A lower bound on a prompt's tokens, from its shape and sizes alone: text (bytes / the
    longest token's bytes), token ids (their count; JSON may carry them as ``1.0``), a list of
    texts or of token-id lists (the longest), or chat messages (their text, plus the tokens the
    template adds per message of each role); 0 for anything else. Never recursive: a request
    nested 400 lists deep is malformed, not long."""
    bytes_per_token = tokenizer.max_token_bytes
    if isinstance(prompt, str):
        return _utf8_bytes(prompt) // bytes_per_token
    if not isinstance(prompt, list | tuple) or not prompt:
        return 0
    first = prompt[0]
    if isinstance(first, int | float) and not isinstance(first, bool):
        return len(prompt)
    if isinstance(first, str | list | tuple):
        return max(
            _utf8_bytes(p) // bytes_per_token if isinstance(p, str) else len(p)
            for p in prompt
            if isinstance(p, str | list | tuple)
        )
    floor = tokenizer.message_token_floor
    text = template = 0
    for message in prompt:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        template += floor.get(role, 0) if isinstance(role, str) else 0
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for part in parts:
            value = part.get("text") if isinstance(part, dict) else part
            if isinstance(value, str):
                text += _utf8_bytes(value)
    return text // bytes_per_token + template


def _is_chat(prompt: object) -> TypeGuard[Sequence[object]]:
    """Whether ``prompt`` is a list of chat messages (its first item an object)."""
    return isinstance(prompt, list | tuple) and bool(prompt) and isinstance(prompt[0], dict)


def _utf8_bytes(text: str) -> int:
    """UTF-8 bytes of ``text``; a lone surrogate counts as the 3 bytes it would take (the
    tokenizer refuses it)."""
    return len(text.encode("utf-8", "surrogatepass"))
