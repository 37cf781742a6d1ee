"""What a generation asks for and what it gives back.

:class:`GenerationConfig` holds the decoding settings of one request (validated, frozen, with the
presets ``greedy()``, ``precise()``, ``balanced()`` and ``creative()``); :class:`GenerationResult`
is the finished output; :class:`FinishReason` says why it ended; :class:`TokenLogprob` is one
prompt token's log-probability with the most likely alternatives at its position. Both the
single-sequence :class:`~zigllama_batch.generator.TextGenerator` and the batch processor use
these types.

Simplified: one completion per request (no ``n``/``best_of``); generated tokens carry the chosen
token's logprob only (alternatives are given for prompt tokens, ``prompt_logprobs``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Self

from .errors import InvalidRequest
from .structured import StructuredOutput

__all__ = [
    "Activations",
    "ChatMessage",
    "FinishReason",
    "GenerationConfig",
    "GenerationResult",
    "Prompt",
    "StreamCallback",
    "TokenLogprob",
]

Activations = Literal["float32", "int8"]
"""What a model's quantized layers multiply: the exact float32 activations, or activations
rounded to int8 as llama.cpp does (see :func:`~zigllama_batch.load_model`)."""

DEFAULT_ACTIVATIONS: Activations = "float32"  # exact: every product the file's values give

ChatMessage = dict[str, Any]
"""One chat message, e.g. ``{"role": "user", "content": "Hi"}``."""

Prompt = str | Sequence[ChatMessage] | Sequence[int]
"""A prompt: plain text, a list of chat messages rendered with the model's chat template, or
token ids used as they are."""

StreamCallback = Callable[[str, int], object]
"""Called with ``(text_chunk, token_id)`` for every generated token (the chunk may be empty
while a multi-byte character or a possible stop string is held back)."""


class FinishReason(enum.StrEnum):
    """Why a generation ended (the strings match the OpenAI API)."""

    STOP = "stop"
    """An end-of-sequence token, a stop token id or a stop string was produced."""
    LENGTH = "length"
    """``max_tokens`` were generated, or the context window is full."""


GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (vLLM's ``_SAMPLING_EPS``): dividing float32 logits by
a smaller one gains nothing over greedy and, near float32's smallest numbers, divides by zero."""

MAX_LOGPROBS = 20
"""Most alternatives ``prompt_logprobs`` may ask for at each position (vLLM's default limit;
OpenAI's legacy completions allow 5)."""

MIN_REPETITION_PENALTY = 1e-2
"""Smallest accepted ``repetition_penalty``. Below it the penalty only says "repeat", as 0.01
already does, and near float32's smallest numbers the division makes logits infinite."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationConfig:
    """Decoding settings for one request.

    ``temperature == 0`` (or below :data:`GREEDY_BELOW`), ``top_k == 1`` and ``top_p == 0``
    mean greedy decoding; every other filter is off at its neutral value
    (``top_k=0``, ``top_p=1``, ``min_p=0``, penalties ``1``/``0``). Invalid values raise
    ``ValueError`` naming the field.
    """

    max_tokens: int = 128
    """Most tokens to generate; 128 is a short answer that keeps a CPU request under seconds.
    0 generates nothing: the prompt runs through the model (for ``prompt_logprobs``) and the
    generation ends with ``length``."""
    temperature: float = 0.7
    """Softmax temperature; 0 picks the most likely token. 0.7 is a common chat default."""
    top_k: int = 40
    """Keep only the k most likely tokens (0 disables); 40 as in llama.cpp's default."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (at
    least the most likely one: 0 is greedy)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the best token's probability."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens already seen, prompt included."""
    presence_penalty: float = 0.0
    """Subtract this from the logit of every token already generated (OpenAI semantics)."""
    frequency_penalty: float = 0.0
    """Subtract this times the token's generated count from its logit (OpenAI semantics)."""
    seed: int | None = None
    """Seed of this request's own random stream; the same seed gives the same tokens whatever
    else shares the batch. None draws fresh entropy. Any int: a negative seed names the same
    stream as its 64-bit two's complement (OpenAI's seeds are signed 64-bit)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are never part of the returned text."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides the model's end-of-sequence token."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (for benchmarks of fixed length)."""
    logprobs: bool = False
    """Return the log-probability of each chosen token under the model's raw distribution."""
    prompt_logprobs: int | None = None
    """Return the log-probability of each prompt token given the ones before it, with this many
    most likely alternatives at its position (0: the token's own only; at most
    :data:`MAX_LOGPROBS`), under the raw distribution as ``logprobs``. Every prompt position
    then runs through the model: no cached prefix stands in for it. None: not asked."""
    structured: StructuredOutput | None = None
    """A shape the text must have (JSON schema, regex, choice, grammar): every token the
    constraint does not allow is masked, and the generation ends with ``stop`` once the
    constraint is complete. Near the end of ``max_tokens`` (or of the context) only tokens
    after which it can still be completed in the tokens left are allowed; where it cannot be,
    the generation ends with ``length``. None: free text."""

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples, so the config stays hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_tokens", self.max_tokens, minimum=0)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_int("top_k", self.top_k, minimum=0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float(
            "repetition_penalty", self.repetition_penalty, low=MIN_REPETITION_PENALTY, high=100.0
        )
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidRequest(f"seed: must be an int, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest(f"stop: every stop string must be a non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, minimum=0)
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name}: must be a bool, got {getattr(self, name)!r}")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0)
            if self.prompt_logprobs > MAX_LOGPROBS:
                raise InvalidRequest(
                    f"prompt_logprobs: must be at most {MAX_LOGPROBS}, got {self.prompt_logprobs}"
                )
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidRequest(
                f"structured: must be a StructuredOutput, got {type(self.structured).__name__}"
            )

    @property
    def is_greedy(self) -> bool:
        """True when decoding picks the most likely token (temperature 0 or below
        :data:`GREEDY_BELOW`, top_k 1, or top_p 0)."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1 or self.top_p == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when any repetition, presence or frequency penalty is active."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def with_(self, **changes: Any) -> Self:
        """Return a copy with the given fields replaced (and validated)."""
        return replace(self, **changes)

    @classmethod
    def greedy(cls, **overrides: Any) -> Self:
        """Always the most likely token: deterministic, best for tests and extraction."""
        return cls(**{"temperature": 0.0, "top_k": 0, "top_p": 1.0, **overrides})

    @classmethod
    def precise(cls, **overrides: Any) -> Self:
        """Low temperature and a tight nucleus: factual answers with little variety."""
        return cls(**{"temperature": 0.3, "top_k": 20, "top_p": 0.8, **overrides})

    @classmethod
    def balanced(cls, **overrides: Any) -> Self:
        """The default trade-off for chat: moderate temperature and nucleus."""
        return cls(
            **{
                "temperature": 0.7,
                "top_k": 40,
                "top_p": 0.9,
                "repetition_penalty": 1.05,
                **overrides,
            }
        )

    @classmethod
    def creative(cls, **overrides: Any) -> Self:
        """High temperature with min-p filtering: varied text that stays on topic."""
        return cls(**{"temperature": 1.1, "top_k": 0, "top_p": 0.95, "min_p": 0.05, **overrides})


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability at its position, and the most likely tokens there."""

    token_id: int
    logprob: float
    """Natural log of the token's probability under the model's raw distribution."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely tokens at this position as ``(token_id, logprob)``, best first (ties
    by lower id); as many as asked for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationResult:
    """The output of one finished generation."""

    text: str
    """The generated text (prompt excluded, stop strings excluded)."""
    token_ids: tuple[int, ...]
    """Every generated token id, including a final end-of-sequence or stop token."""
    finish_reason: FinishReason
    """Why generation ended."""
    prompt_tokens: int
    """How many tokens the prompt encoded to."""
    completion_tokens: int
    """How many tokens were generated (``len(token_ids)``)."""
    time_to_first_token_ms: float
    """Milliseconds from the start of the request to its first generated token."""
    total_time_ms: float
    """Milliseconds from the start of the request to its end."""
    logprobs: tuple[float, ...] | None = field(default=None)
    """Log-probability of each generated token, when asked for."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """One entry per prompt token, when ``prompt_logprobs`` asked for them: the token given
    the ones before it; None for the first (nothing comes before it)."""
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache instead of the model."""
    draft_tokens: int = 0
    """Drafted tokens verified for this generation (speculative decoding; 0 when off)."""
    accepted_draft_tokens: int = 0
    """Of those, the ones accepted: tokens generated without a step of their own."""

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the total time (0 when no time passed)."""
        return self.completion_tokens / (self.total_time_ms / 1000) if self.total_time_ms else 0.0


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name}: must be an int, got {value!r}")
    if value < minimum:
        raise InvalidRequest(f"{name}: must be >= {minimum}, got {value}")


def _check_float(
    name: str, value: object, *, low: float, high: float, low_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name}: must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidRequest(f"{name}: must be in {bracket}{low}, {high}], got {value}")
