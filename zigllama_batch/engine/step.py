"""What one engine step takes in and gives back, and the per-sequence progress that builds it.

Inside: :class:`SequenceStep` (one sequence's share of a step: its cache slot, its new tokens,
the position of the first, and the sampling state when a token is to be sampled),
:class:`TokenSample` (the token sampled for it) and :class:`SequenceState` (how far a sequence
has got: how many of its tokens are in its cache slot, and what it feeds next). The batch
processor and :class:`~zigllama_batch.generator.TextGenerator` both build their steps from a
``SequenceState``, so a prompt is chunked, and a decode token fed, the same way wherever it runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .sampler import SamplingState

__all__ = ["PoolSave", "SequenceState", "SequenceStep", "TokenSample"]


@dataclass(frozen=True, slots=True)
class PoolSave:
    """Positions ``[start, end)`` of a slot to save in the host-memory pool of evicted
    prefixes, block by block: ``blocks[i]`` takes the ``i``-th run of the pool's block size
    from ``start`` (the last one possibly partial)."""

    start: int
    end: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SequenceStep:
    """One sequence's part of an engine step."""

    slot: int
    """The KV-cache slot holding this sequence's earlier keys and values."""
    token_ids: Sequence[int]
    """New tokens: a prompt chunk, or the one token sampled last step."""
    start_pos: int
    """Position of ``token_ids[0]``; positions before it must already be in the cache."""
    sampling: SamplingState | None = None
    """Sample the next token with this state; None for a prompt chunk that is not the last
    (the model step itself never reads it)."""
    prefix_from: int | None = None
    """Before the step, copy positions ``[0, start_pos)`` from this slot into ``slot`` (a
    prefix computed for another sequence); None when ``slot`` already holds them."""
    prefix_from_pool: tuple[int, ...] | None = None
    """Before the step, copy positions ``[0, start_pos)`` into ``slot`` from these blocks of
    the host-memory pool of evicted prefixes, in order."""
    save_to_pool: PoolSave | None = None
    """Before anything else, save these positions of ``slot`` (what an earlier sequence left
    there) to the pool."""


@dataclass(frozen=True, slots=True)
class TokenSample:
    """A sampled token and its log-probability (NaN unless the request asked for logprobs)."""

    token_id: int
    logprob: float
    forced: tuple[int, ...] = ()
    """Tokens an output constraint forces right after this one: generated without being
    sampled (no logprob), and fed with it in the sequence's next step."""
    completes: bool = False
    """The output constraint is complete after this token and the forced ones."""
    constraint_error: str | None = None
    """Why the output constraint cannot go on (the request then ends with an error)."""

    def each(self) -> list[TokenSample]:
        """This token, then each forced one as a sample of its own (logprob NaN); only the
        last says whether the constraint is complete."""
        if not self.forced:
            return [self]
        *rest, last = self.forced
        return [
            TokenSample(self.token_id, self.logprob),
            *(TokenSample(t, math.nan) for t in rest),
            TokenSample(last, math.nan, completes=self.completes),
        ]


class SequenceState:
    """One sequence's progress through the model: which of its tokens its cache slot holds,
    and the step that feeds the next ones.

    The prompt goes in chunks of at most the caller's budget; the step that completes it carries
    the sampling state, so the first token is sampled from the last prompt position. After that,
    each step feeds the token sampled last.
    """

    __slots__ = (
        "num_computed",
        "pending",
        "prefix_from",
        "prefix_from_pool",
        "prompt_ids",
        "sampling",
        "save_to_pool",
        "slot",
    )

    def __init__(
        self,
        prompt_ids: Sequence[int],
        *,
        slot: int = -1,
        sampling: SamplingState | None = None,
    ) -> None:
        """Args:
        prompt_ids: the prompt's token ids (at least one).
        slot: the cache slot, once the sequence has one.
        sampling: the sampling state, once the sequence has one.
        """
        self.prompt_ids = prompt_ids
        self.slot = slot
        self.sampling = sampling
        self.num_computed = 0
        """Tokens (prompt, then output) whose keys and values are in the slot."""
        self.pending: list[int] = []
        """The token sampled last and any forced after it: what the next decode step feeds."""
        self.prefix_from: int | None = None
        """A slot whose first ``num_computed`` positions the first step copies (prefix reuse)."""
        self.prefix_from_pool: tuple[int, ...] | None = None
        """Pool blocks holding the first ``num_computed`` positions, which the first step
        copies."""
        self.save_to_pool: PoolSave | None = None
        """What the first step saves to the pool (left in the slot by an earlier sequence)
        before overwriting it."""

    def reuse_prefix(
        self, n: int, *, copy_from: int | None = None, from_pool: tuple[int, ...] | None = None
    ) -> None:
        """Start after the first ``n`` prompt tokens, whose keys and values are already in the
        slot, or in slot ``copy_from`` or pool blocks ``from_pool`` (copied by the first step).
        At least the last prompt token is always computed, so its logits give the first
        sampled token."""
        if not 0 <= n < len(self.prompt_ids) or self.num_computed:
            raise ValueError(f"cannot reuse {n} of {len(self.prompt_ids)} prompt tokens now")
        self.num_computed = n
        self.prefix_from = copy_from if n else None
        self.prefix_from_pool = from_pool if n else None

    @property
    def prefilling(self) -> bool:
        """True while prompt tokens remain to be fed to the model."""
        return self.num_computed < len(self.prompt_ids)

    def next_step(self, budget: int) -> SequenceStep:
        """The step that feeds this sequence's next tokens: up to ``budget`` prompt tokens, or
        the last sampled token."""
        start = self.num_computed
        if self.prefilling:
            chunk = self.prompt_ids[start : start + budget]
            completes = start + len(chunk) == len(self.prompt_ids)
            sampling = self.sampling if completes else None
            return SequenceStep(
                self.slot,
                chunk,
                start,
                sampling,
                self.prefix_from,
                self.prefix_from_pool,
                self.save_to_pool,
            )
        assert self.pending, "a decode step needs a sampled token"
        return SequenceStep(self.slot, self.pending, start, self.sampling)

    def advance(self, step: SequenceStep, sample: TokenSample | None) -> None:
        """Account for a step of this sequence that ran, and the token it sampled (if any)."""
        self.num_computed += len(step.token_ids)
        self.prefix_from = self.prefix_from_pool = self.save_to_pool = None  # done, if due
        if sample is not None:
            self.pending = [sample.token_id, *sample.forced]

    def __repr__(self) -> str:
        return (
            f"SequenceState(slot={self.slot}, prompt={len(self.prompt_ids)}, "
            f"computed={self.num_computed})"
        )
