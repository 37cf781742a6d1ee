"""Speculative decoding's policy: which decoding sequences draft, and how many tokens.

Inside: :class:`Speculation`. Before a step, :meth:`Speculation.drafts` gives each decoding
sequence of the batch the tokens its :class:`~zigllama_batch.engine.drafts.PromptLookup`
proposes; the step verifies them (``Engine.step``), and :meth:`Speculation.observe` follows
what was accepted. The rule, from measurement (``benchmarks/speculative.py``): a step's cost
grows with its rows, so drafting pays while the batch is small, where a step is bound by
reading the weights and a few more rows cost little; beyond ``speculative_max_batch``
decoding sequences nothing is drafted. A sequence drafts only when its lookup finds a match,
at most ``speculative_tokens`` tokens, fewer after its drafts were rejected (the lookup's
limit), never past its ``max_tokens`` or its cache slot, and drafts share what the step's
token budget leaves after every sequence's own token.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.drafts import PromptLookup
from ..engine.step import SequenceStep, TokenSample
from .request import TrackedRequest
from .types import BatchConfig

__all__ = ["Speculation"]


class Speculation:
    """Drafts for one processor's sequences (event loop only)."""

    def __init__(self, config: BatchConfig, max_context: int) -> None:
        self.most = config.speculative_tokens
        self.max_batch = config.speculative_max_batch
        self.max_context = max_context
        self._lookups: dict[TrackedRequest, PromptLookup] = {}

    def drafts(
        self, running: Sequence[TrackedRequest], budget: int
    ) -> dict[TrackedRequest, list[int]]:
        """Drafted tokens for the decoding sequences of ``running``, at most ``budget`` in
        all (the step's token budget after every sequence's own tokens)."""
        decoding = [r for r in running if not r.seq.prefilling and not r.finished]
        if not self.most or not decoding or len(decoding) > self.max_batch:
            return {}
        out: dict[TrackedRequest, list[int]] = {}
        for rec in decoding:
            if budget <= 0:
                break
            lookup = self._lookup(rec)
            seq = rec.seq
            room = min(
                budget,
                # After k accepted drafts, the token sampled next is output k + 1: within
                # max_tokens, and with a position of its own in the slot.
                rec.config.max_tokens - len(rec.decoder.token_ids) - 1,
                self.max_context - seq.num_computed - len(seq.pending) - 1,
            )
            draft = lookup.propose(room)
            if draft:
                out[rec] = draft
                budget -= len(draft)
        return out

    def observe(self, rec: TrackedRequest, step: SequenceStep, out: TokenSample) -> None:
        """A step of ``rec`` ran and gave ``out``: follow its new tokens and its drafts'
        outcome."""
        lookup = self._lookups.get(rec)
        if lookup is None:
            return
        if step.draft:
            lookup.record(step.draft, len(out.accepted), self.most)
        lookup.extend(sample.token_id for sample in out.each())

    def forget(self, rec: TrackedRequest) -> None:
        """``rec`` left the batch (finished, or preempted: its lookup is rebuilt if it
        returns)."""
        self._lookups.pop(rec, None)

    def _lookup(self, rec: TrackedRequest) -> PromptLookup:
        lookup = self._lookups.get(rec)
        if lookup is None:
            history = [*rec.prompt_ids, *rec.decoder.token_ids]
            lookup = self._lookups[rec] = PromptLookup(history, limit=self.most)
        return lookup

    def __repr__(self) -> str:
        return f"Speculation(tokens={self.most}, max_batch={self.max_batch})"
