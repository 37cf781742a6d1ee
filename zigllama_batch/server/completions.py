"""``POST /v1/completions``: a prompt (text or token ids) continued.

Inside: :class:`Completions`, the adapter (body to request), and its turn, which renders the
choice: ``text``, and with ``logprobs`` the chosen tokens' logprobs in the legacy shape
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from ..batching.types import BatchResult
from ..engine.tokenizer import Tokenizer
from .backend import ChunkStream
from .choices import ChoiceTurn, prepare_sampling
from .core import Core
from .schema import CompletionRequest

__all__ = ["Completions"]


class Completions:
    """The adapter of ``POST /v1/completions``."""

    schema = CompletionRequest
    prompt_param = "prompt"

    def __init__(self, core: Core) -> None:
        self.core = core

    def raw_prompt(self, data: Mapping[str, Any]) -> object:
        """The body's ``prompt``."""
        return data.get("prompt")

    async def prepare(self, body: CompletionRequest) -> _CompletionTurn:
        """The request the body asks for."""
        core = self.core
        prompt_ids = core.processor.encode_prompt(body.prompt_value())
        request, constraint = await prepare_sampling(core, body, prompt_ids, id_prefix="cmpl")
        return _CompletionTurn(
            request,
            body,
            model=core.model_name,
            prompt_param=self.prompt_param,
            constraint=constraint,
            tokenizer=core.processor.tokenizer,
        )


class _CompletionTurn(ChoiceTurn):
    kind = "text_completion"
    chunk_kind = "text_completion"

    def __init__(self, *args: Any, tokenizer: Tokenizer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer

    def choice(self, result: BatchResult) -> dict[str, Any]:
        r = result.result
        logprobs = None
        if r.logprobs is not None:
            tokens = [self._token_text(t) for t in r.token_ids]
            offsets, at = [], 0
            for t in tokens:
                offsets.append(at)
                at += len(t)
            logprobs = {
                "tokens": tokens,
                "token_logprobs": list(r.logprobs),
                "top_logprobs": [{t: lp} for t, lp in zip(tokens, r.logprobs, strict=True)],
                "text_offset": offsets,
            }
        return {
            "index": 0,
            "text": r.text,
            "logprobs": logprobs,
            "finish_reason": str(r.finish_reason),
        }

    async def deltas(self, chunks: ChunkStream) -> AsyncIterator[dict[str, Any]]:
        offset = 0  # characters of text sent so far
        async for chunk in chunks:
            self.generated += 1
            if not chunk.text and chunk.finish_reason is None and chunk.logprob is None:
                continue  # text held back (partial character or possible stop string)
            logprobs = None
            if chunk.logprob is not None:
                token = self._token_text(chunk.token_id)
                logprobs = {
                    "tokens": [token],
                    "token_logprobs": [chunk.logprob],
                    "top_logprobs": [{token: chunk.logprob}],
                    "text_offset": [offset],
                }
            finish = str(chunk.finish_reason) if chunk.finish_reason is not None else None
            yield {"index": 0, "text": chunk.text, "logprobs": logprobs, "finish_reason": finish}
            offset += len(chunk.text)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
