"""``POST /v1/completions``: a prompt (text or token ids) continued.

Inside: :class:`Completions`, the adapter (body to request), and its turn, which renders the
choice: ``text``, and with ``logprobs`` the chosen tokens' logprobs in the legacy shape
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

With ``echo`` the prompt comes first: its text (its tokens as they decode) before the generated
text, and, with ``logprobs``, its tokens before the generated ones, each with its logprob given
the tokens before it (null for the first, which has nothing before it) and, in
``top_logprobs``, the ``logprobs`` most likely tokens at its position and itself. ``text_offset``
counts characters of the whole text, prompt included. Streamed, the prompt is the first chunk
(sent once the prompt has run, since its logprobs are known then). ``max_tokens`` 0 generates
nothing: the answer is the prompt with ``echo``, else an empty text, ending with ``length``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ..batching.types import BatchRequest, BatchResult
from ..engine.tokenizer import Tokenizer
from ..generation import TokenLogprob
from .backend import ChunkStream
from .choices import ChoiceTurn, prepare_sampling
from .core import Core
from .schema import CompletionRequest

__all__ = ["Completions"]

PromptLogprobs = Sequence[TokenLogprob | None] | None


class Completions:
    """The adapter of ``POST /v1/completions``."""

    schema = CompletionRequest
    prompt_param = "prompt"

    def __init__(self, core: Core) -> None:
        self.core = core

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
            prompt_ids=prompt_ids,
        )


class _CompletionTurn(ChoiceTurn):
    kind = "text_completion"
    chunk_kind = "text_completion"

    def __init__(
        self,
        request: BatchRequest,
        body: CompletionRequest,
        *,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        **kwargs: Any,
    ) -> None:
        super().__init__(request, body, **kwargs)
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.echo = body.echo
        self.logprobs = body.logprobs is not None

    def choice(self, result: BatchResult) -> dict[str, Any]:
        r = result.result
        echo = self._echo(r.prompt_logprobs) if self.echo else None
        logprobs: dict[str, list[Any]] | None = None
        if r.logprobs is not None:
            tokens = [_token_text(self.tokenizer, t) for t in r.token_ids]
            offsets, at = [], 0 if echo is None else len(echo.text)
            for t in tokens:
                offsets.append(at)
                at += len(t)
            logprobs = {
                "tokens": tokens,
                "token_logprobs": list(r.logprobs),
                "top_logprobs": [{t: lp} for t, lp in zip(tokens, r.logprobs, strict=True)],
                "text_offset": offsets,
            }
            if echo is not None:
                logprobs = echo.before(logprobs)
        return {
            "index": 0,
            "text": r.text if echo is None else echo.text + r.text,
            "logprobs": logprobs,
            "finish_reason": str(r.finish_reason),
        }

    async def deltas(self, chunks: ChunkStream) -> AsyncIterator[dict[str, Any]]:
        offset = 0  # characters of text sent so far
        sent = False  # a choice was sent
        async for chunk in chunks:
            self.generated += 1
            if self.echo and not sent:  # the prompt first, once it has run
                echo = self._echo(chunk.prompt_logprobs)
                logprobs = echo.logprobs()
                yield {"index": 0, "text": echo.text, "logprobs": logprobs, "finish_reason": None}
                offset, sent = len(echo.text), True
            if not chunk.text and chunk.finish_reason is None and chunk.logprob is None:
                continue  # text held back (partial character or possible stop string)
            logprobs = None
            if chunk.logprob is not None:
                token = _token_text(self.tokenizer, chunk.token_id)
                logprobs = {
                    "tokens": [token],
                    "token_logprobs": [chunk.logprob],
                    "top_logprobs": [{token: chunk.logprob}],
                    "text_offset": [offset],
                }
            finish = str(chunk.finish_reason) if chunk.finish_reason is not None else None
            yield {"index": 0, "text": chunk.text, "logprobs": logprobs, "finish_reason": finish}
            offset += len(chunk.text)
            sent = True
        if not sent:  # nothing generated (max_tokens 0): the whole answer in one chunk
            result = chunks.result
            assert result is not None
            yield self.choice(result)

    def _echo(self, scores: PromptLogprobs) -> _Echo:
        return _Echo(self.tokenizer, self.prompt_ids, scores if self.logprobs else None)


class _Echo:
    """The prompt as an echoed completion shows it: its text, and its tokens' logprobs."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], scores: PromptLogprobs) -> None:
        """Args:
        tokenizer: the model's tokenizer.
        prompt_ids: the prompt's tokens.
        scores: their logprobs (None: not asked for).
        """
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.scores = scores
        detok = tokenizer.detokenizer()
        text, self.offsets = "", []
        for t in prompt_ids:
            self.offsets.append(len(text))
            text += detok.push(t)
        self.text = text + detok.flush()

    def logprobs(self) -> dict[str, Any] | None:
        """The prompt's tokens in the legacy logprobs shape (None unless logprobs were asked
        for)."""
        if self.scores is None:
            return None

        def text(token_id: int) -> str:
            return _token_text(self.tokenizer, token_id)

        return {
            "tokens": [text(t) for t in self.prompt_ids],
            "token_logprobs": [None if s is None else s.logprob for s in self.scores],
            "top_logprobs": [None if s is None else _top(s, text) for s in self.scores],
            "text_offset": list(self.offsets),
        }

    def before(self, generated: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """The prompt's logprobs followed by the generated tokens'."""
        prompt = self.logprobs()
        assert prompt is not None, "logprobs were asked for, so the prompt is scored"
        return {key: [*prompt[key], *generated[key]] for key in prompt}


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text as the legacy logprobs show it (bytes of a split character as U+FFFD)."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _top(score: TokenLogprob, text: Callable[[int], str]) -> dict[str, float]:
    """A prompt token's legacy ``top_logprobs`` entry: the most likely tokens, best first, and
    the token itself (vLLM's shape: up to ``logprobs`` + 1 entries)."""
    top = {text(t): lp for t, lp in score.top}
    top.setdefault(text(score.token_id), score.logprob)
    return top
