"""From sampled token ids to the text a caller sees, with every stop rule applied.

Inside: :class:`OutputDecoder`, one per generated sequence. It detokenizes incrementally, ends the
sequence on an end-of-sequence or stop token, a stop string, ``max_tokens`` or a full context,
and never emits any part of a stop string: text that could still grow into one is held back
until it cannot. Once finished, :meth:`OutputDecoder.result` is the one place a
:class:`~zigllama_batch.generation.GenerationResult` is made.
"""

from __future__ import annotations

from ..generation import FinishReason, GenerationConfig, GenerationResult, TokenLogprob
from .tokenizer import Tokenizer

__all__ = ["OutputDecoder"]


class OutputDecoder:
    """Turns one sequence's sampled tokens into text chunks and decides when it is finished."""

    __slots__ = (
        "_config",
        "_detok",
        "_held",
        "_max_context",
        "_max_stop_len",
        "_prompt_tokens",
        "_stop_ids",
        "finish_reason",
        "logprobs",
        "text",
        "token_ids",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: GenerationConfig,
        *,
        prompt_tokens: int,
        max_context: int,
    ) -> None:
        """Args:
        tokenizer: the model's tokenizer.
        config: the request's settings (stop rules, ``max_tokens``).
        prompt_tokens: length of the prompt, for the context limit.
        max_context: most tokens the sequence may hold, prompt included.
        """
        self._config = config
        self._detok = tokenizer.detokenizer()
        stop_ids = set(config.stop_token_ids)
        if not config.ignore_eos:
            stop_ids |= tokenizer.stop_ids
        self._stop_ids = frozenset(stop_ids)
        self._max_stop_len = max((len(s) for s in config.stop), default=0)
        self._prompt_tokens = prompt_tokens
        self._max_context = max_context
        self._held = ""  # decoded text not emitted yet: it may be the start of a stop string
        self.text = ""
        """Text emitted so far."""
        self.token_ids: list[int] = []
        """Tokens generated so far."""
        self.logprobs: list[float] = []
        """Log-probabilities of the generated tokens (when the config asks for them)."""
        self.finish_reason: FinishReason | None = None
        """Why the sequence ended, once it has."""

    @property
    def finished(self) -> bool:
        """True once a stop rule has ended the sequence."""
        return self.finish_reason is not None

    def add(self, token_id: int, logprob: float | None = None, *, completes: bool = False) -> str:
        """Take the next generated token; return the text that may be shown now (maybe empty).
        ``completes``: the output constraint is complete with this token, so the sequence ends
        with ``stop`` unless a stop rule ended it first (even if this is the last token
        ``max_tokens`` allows: the text is whole)."""
        if self.finish_reason is not None:
            raise RuntimeError("the sequence is already finished")
        self.token_ids.append(token_id)
        if self._config.logprobs and logprob is not None:
            self.logprobs.append(logprob)
        if token_id in self._stop_ids:
            return self._finish(FinishReason.STOP, self._held + self._detok.flush())
        pending = self._held + self._detok.push(token_id)
        if self._config.stop:
            cut = min((i for s in self._config.stop if (i := pending.find(s)) >= 0), default=-1)
            if cut >= 0:
                return self._finish(FinishReason.STOP, pending[:cut])
        if completes:  # before the length check: text completed by the last token is whole
            return self._finish(FinishReason.STOP, pending + self._detok.flush())
        if (
            len(self.token_ids) >= self._config.max_tokens
            or self._prompt_tokens + len(self.token_ids) >= self._max_context
        ):
            return self._finish(FinishReason.LENGTH, pending + self._detok.flush())
        hold = self._holdback(pending)
        self._held = pending[len(pending) - hold :]
        chunk = pending[: len(pending) - hold]
        self.text += chunk
        return chunk

    def finish_empty(self) -> None:
        """End a sequence that generates nothing (``max_tokens`` 0) once its prompt has run:
        ``length``, with no text.

        Raises:
            RuntimeError: the sequence is already finished, or may generate.
        """
        if self.finish_reason is not None or self._config.max_tokens:
            raise RuntimeError("only an unfinished sequence of max_tokens 0 ends empty")
        self.finish_reason = FinishReason.LENGTH

    def result(
        self,
        *,
        time_to_first_token_ms: float,
        total_time_ms: float,
        cached_tokens: int = 0,
        draft_tokens: int = 0,
        accepted_draft_tokens: int = 0,
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None,
    ) -> GenerationResult:
        """The finished generation, with the timings its runner measured and the prompt's
        logprobs when they were asked for.

        Raises:
            RuntimeError: the sequence has not finished.
        """
        if self.finish_reason is None:
            raise RuntimeError("the sequence has not finished")
        return GenerationResult(
            text=self.text,
            token_ids=tuple(self.token_ids),
            finish_reason=self.finish_reason,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=len(self.token_ids),
            time_to_first_token_ms=time_to_first_token_ms,
            total_time_ms=total_time_ms,
            logprobs=tuple(self.logprobs) if self._config.logprobs else None,
            cached_tokens=cached_tokens,
            draft_tokens=draft_tokens,
            accepted_draft_tokens=accepted_draft_tokens,
            prompt_logprobs=prompt_logprobs,
        )

    def _finish(self, reason: FinishReason, chunk: str) -> str:
        self.finish_reason = reason
        self._held = ""
        self.text += chunk
        return chunk

    def _holdback(self, pending: str) -> int:
        """Length of the longest tail of ``pending`` that is a proper start of a stop string."""
        for n in range(min(len(pending), self._max_stop_len - 1), 0, -1):
            tail = pending[-n:]
            if any(s.startswith(tail) for s in self._config.stop):
                return n
        return 0
