"""The numeric step every generation goes through: one forward pass plus sampling.

Inside: :class:`SequenceStep` (one sequence's share of a step), :class:`TokenSample` (what a step
gives back for it) and :class:`Engine`, which owns a model, its tokenizer and a KV cache with its
slots. ``Engine.step`` takes plain data and returns plain data, runs in a worker thread, and is
the signature the batch processor is written against (its tests use a fake with the same one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..generation import GenerationConfig
from .kv_cache import KVCache
from .model import LLaMAModel, StepInput
from .sampler import SamplingState, sample
from .tokenizer import Tokenizer

__all__ = ["DEFAULT_MAX_CONTEXT", "Engine", "SequenceStep", "TokenSample"]

DEFAULT_MAX_CONTEXT = 2048
"""Positions a cache slot holds unless told otherwise: room for a long chat turn while 32 slots of
a small model stay near a gigabyte. Capped by the model's own context length."""


@dataclass(frozen=True, slots=True)
class SequenceStep:
    """One sequence's part of an engine step."""

    slot: int
    """The sequence's KV-cache slot."""
    token_ids: Sequence[int]
    """New tokens: a prompt chunk or the last sampled token."""
    start_pos: int
    """Position of the first new token."""
    sampling: SamplingState | None
    """Sample the next token with this state, or None for a prompt chunk that is not the last."""


@dataclass(frozen=True, slots=True)
class TokenSample:
    """A sampled token and its log-probability (NaN unless the request asked for logprobs)."""

    token_id: int
    logprob: float


class Engine:
    """A model, its tokenizer and a KV cache of ``n_slots`` sequences.

    Slot bookkeeping (:meth:`allocate_slot`, :meth:`free_slot`) belongs to one owner thread;
    :meth:`step` may run in a worker thread, touching only the slots its items name.
    """

    def __init__(
        self,
        model: LLaMAModel,
        tokenizer: Tokenizer,
        *,
        n_slots: int = 1,
        max_context: int | None = None,
    ) -> None:
        """Args:
        model: the weights and forward pass.
        tokenizer: the model's tokenizer.
        n_slots: sequences that can be in flight at once.
        max_context: positions per slot (prompt plus output); default
            ``min(DEFAULT_MAX_CONTEXT, model context)``.
        """
        if tokenizer.vocab_size > model.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model scores "
                f"{model.vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        context = max_context or min(DEFAULT_MAX_CONTEXT, model.config.context_length)
        self.cache: KVCache = model.new_cache(n_slots, context)

    @property
    def n_slots(self) -> int:
        """Sequences the cache holds at once."""
        return self.cache.n_slots

    @property
    def max_context(self) -> int:
        """Positions one sequence may occupy, prompt included."""
        return self.cache.max_context

    @property
    def free_slots(self) -> int:
        """Slots not held by a sequence."""
        return self.cache.n_free

    def allocate_slot(self) -> int:
        """Reserve a cache slot for a new sequence (lowest free first)."""
        return self.cache.allocate()

    def free_slot(self, slot: int) -> None:
        """Release a sequence's slot."""
        self.cache.free(slot)

    def new_sampling(self, config: GenerationConfig, prompt_ids: Sequence[int]) -> SamplingState:
        """Sampling state (random stream, penalty counts) for a new sequence."""
        return SamplingState(config, prompt_ids, self.model.vocab_size)

    def step(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        """Run one forward pass over ``items`` and sample where asked.

        Returns:
            One entry per item: the sampled token, or None for items without a sampling state.
        """
        logits = self.model.step(
            [StepInput(it.slot, it.token_ids, it.start_pos) for it in items], self.cache
        )
        rows = [i for i, it in enumerate(items) if it.sampling is not None]
        out: list[TokenSample | None] = [None] * len(items)
        if rows:
            states = [s for it in items if (s := it.sampling) is not None]
            tokens, logprobs = sample(logits[rows], states)
            for j, i in enumerate(rows):
                out[i] = TokenSample(int(tokens[j]), float(logprobs[j]))
        return out

    def __repr__(self) -> str:
        return f"Engine({self.model!r}, {self.cache!r})"
