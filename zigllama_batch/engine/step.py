"""What one engine step takes in and gives back, and the per-sequence progress that builds it.

Inside: :class:`SequenceStep` (one sequence's share of a step: its cache slot, its new tokens,
the position of the first, the sampling state when a token is to be sampled, how many of the
new tokens are drafts to verify, what its slot takes in before the step, and where the scores
of a prompt chunk go when the prompt is scored),
:class:`TokenSample` (the token sampled for it, after the drafted tokens it accepted) and
:class:`SequenceState` (how far a sequence has got: how many of its tokens are in its cache
slot, and what it feeds next). The batch
processor and :class:`~zigllama_batch.generator.TextGenerator` both build their steps from a
``SequenceState``, so a prompt is chunked, and a decode token fed, the same way wherever it runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..kv.storage import Transfer
from .sampler import SamplingState
from .scoring import PromptScores

__all__ = ["SequenceState", "SequenceStep", "TokenSample"]


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
    transfer: Transfer | None = None
    """What the storage moves into and out of ``slot`` before the step (the KV manager's
    business); None when ``slot`` already holds positions ``[0, start_pos)``."""
    draft: int = 0
    """How many of the last ``token_ids`` are drafted (speculative) tokens: the step samples
    at the position before them and at each of them, and accepts a draft only where it is the
    token sampled there (see :class:`TokenSample`). Zero for a plain step."""
    scores: PromptScores | None = None
    """Score the prompt tokens this chunk's positions predict, into this (the prompt's
    logprobs, see :mod:`~zigllama_batch.engine.scoring`); None: the prompt is not scored."""

    @property
    def logit_rows(self) -> int:
        """How many of the last new tokens get their next-token logits computed: every one
        of a scored prompt chunk, else the last ``1 + draft`` (the positions sampled at)."""
        return len(self.token_ids) if self.scores is not None else 1 + self.draft


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
    accepted: tuple[tuple[int, float], ...] = ()
    """Drafted tokens the step accepted before this one, each with its log-probability: the
    tokens sampled at the drafts' positions that were the drafts themselves. This token is
    the one sampled after them (where a draft was not, or after the last)."""

    def each(self) -> list[TokenSample]:
        """The accepted drafts, this token, then each forced one, as samples of their own
        (forced ones with logprob NaN); only the last says whether the constraint is
        complete."""
        if not self.forced and not self.accepted:
            return [self]
        drafts = [TokenSample(t, lp) for t, lp in self.accepted]
        if not self.forced:
            return [*drafts, TokenSample(self.token_id, self.logprob, completes=self.completes)]
        *rest, last = self.forced
        return [
            *drafts,
            TokenSample(self.token_id, self.logprob),
            *(TokenSample(t, math.nan) for t in rest),
            TokenSample(last, math.nan, completes=self.completes),
        ]


class SequenceState:
    """One sequence's progress through the model: which of its tokens its cache slot holds,
    and the step that feeds the next ones.

    The prompt goes in chunks of at most the caller's budget; the step that completes it carries
    the sampling state, so the first token is sampled from the last prompt position (unless the
    sequence generates nothing: then its prompt is all it computes). After that, each step feeds
    the token sampled last. When the prompt is scored, each chunk carries the scores to fill.
    """

    __slots__ = (
        "generates",
        "num_computed",
        "outputs",
        "pending",
        "prompt_ids",
        "restarts",
        "sampling",
        "scores",
        "slot",
        "transfer",
    )

    def __init__(
        self,
        prompt_ids: Sequence[int],
        *,
        slot: int = -1,
        sampling: SamplingState | None = None,
        scores: PromptScores | None = None,
        generates: bool = True,
    ) -> None:
        """Args:
        prompt_ids: the prompt's token ids (at least one).
        slot: the cache slot, once the sequence has one.
        sampling: the sampling state, once the sequence has one.
        scores: where the prompt's logprobs go, when they are asked for.
        generates: False for a sequence that only computes its prompt (``max_tokens`` 0):
            the step that completes it samples nothing.
        """
        self.prompt_ids = prompt_ids
        self.slot = slot
        self.sampling = sampling
        self.scores = scores
        self.generates = generates
        self.num_computed = 0
        """Tokens (prompt, then output) whose keys and values are in the slot."""
        self.pending: list[int] = []
        """The token sampled last and any forced after it: what the next decode step feeds."""
        self.transfer: Transfer | None = None
        """What the next step moves into and out of the slot first (set by the KV manager)."""
        self.outputs: list[int] = []
        """Output tokens fed to the model (their keys and values follow the prompt's)."""
        self.restarts = 0
        """Times the sequence lost its slot and started over (preemption)."""

    def restart(self) -> None:
        """Start over without a slot: the prompt, the output fed so far and the tokens
        pending become the prompt to compute, whose last step samples the next token (the
        sampling state goes on where it was, so the output is the same)."""
        self.prompt_ids = [*self.prompt_ids, *self.outputs, *self.pending]
        self.outputs, self.pending = [], []
        self.num_computed = 0
        self.slot, self.transfer = -1, None
        self.restarts += 1

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` output positions computed.

        Raises:
            ValueError: fewer than ``n`` output tokens were fed.
        """
        if not 0 <= n <= len(self.outputs):
            raise ValueError(f"cannot roll back {n} of {len(self.outputs)} output positions")
        if n:
            del self.outputs[-n:]
            self.num_computed -= n

    def reuse_prefix(self, n: int) -> None:
        """Start after the first ``n`` prompt tokens, whose keys and values the slot holds by
        the first step (in place, or moved in by its transfer). At least the last prompt token
        is always computed, so its logits give the first sampled token."""
        if (
            not 0 <= n < len(self.prompt_ids)
            or self.num_computed
            or (n and not self.may_reuse_prefix)
        ):
            raise ValueError(f"cannot reuse {n} of {len(self.prompt_ids)} prompt tokens now")
        self.num_computed = n

    @property
    def may_reuse_prefix(self) -> bool:
        """False while the prompt is being scored: every position's logits are needed, and a
        prefix taken from the cache has none."""
        return self.scores is None or self.scores.complete

    @property
    def length(self) -> int:
        """Tokens of a decoding sequence: those its slot holds, then the ones pending."""
        return self.num_computed + len(self.pending)

    def tokens_from(self, start: int) -> list[int]:
        """The sequence's tokens from position ``start`` on (prompt, output fed, pending):
        what a second cache holding its first ``start`` positions (a draft model's) feeds to
        catch up. For a decoding sequence."""
        n = len(self.prompt_ids)
        if start >= n:
            return [*self.outputs[start - n :], *self.pending]
        return [*self.prompt_ids[start:], *self.outputs, *self.pending]

    @property
    def prefilling(self) -> bool:
        """True while prompt tokens remain to be fed to the model."""
        return self.num_computed < len(self.prompt_ids)

    def next_step(self, budget: int, draft: Sequence[int] = ()) -> SequenceStep:
        """The step that feeds this sequence's next tokens: up to ``budget`` prompt tokens, or
        the last sampled token (and any forced after it) followed by ``draft``, drafted tokens
        to verify (decode only)."""
        start = self.num_computed
        if self.prefilling:
            chunk = self.prompt_ids[start : start + budget]
            completes = start + len(chunk) == len(self.prompt_ids)
            sampling = self.sampling if completes and self.generates else None
            scores = None if self.may_reuse_prefix else self.scores
            return SequenceStep(self.slot, chunk, start, sampling, self.transfer, scores=scores)
        assert self.pending, "a decode step needs a sampled token"
        if draft:
            tokens = [*self.pending, *draft]
            return SequenceStep(self.slot, tokens, start, self.sampling, draft=len(draft))
        return SequenceStep(self.slot, self.pending, start, self.sampling)

    def advance(self, step: SequenceStep, sample: TokenSample | None) -> int:
        """Account for a step of this sequence that ran, and the token it sampled (if any).

        Returns:
            Drafted tokens the step did not accept: their positions are computed and must be
            rolled back (:meth:`rollback`).
        """
        if not self.prefilling:
            self.outputs.extend(step.token_ids)
        self.num_computed += len(step.token_ids)
        self.transfer = None  # made, if due
        if sample is not None:
            self.pending = [sample.token_id, *sample.forced]
        accepted = 0 if sample is None else len(sample.accepted)
        return step.draft - accepted

    def __repr__(self) -> str:
        return (
            f"SequenceState(slot={self.slot}, prompt={len(self.prompt_ids)}, "
            f"computed={self.num_computed})"
        )
