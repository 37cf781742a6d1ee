"""Speculative decoding's policy: which decoding sequences draft, how many tokens, and from
which drafter.

Inside: :class:`Speculation`. Before a step, :meth:`Speculation.drafts` gives each decoding
sequence of the batch the tokens its :class:`~zigllama_batch.engine.drafts.PromptLookup`
proposes, or else, when the processor has a draft model, the tokens the draft model proposes
(:class:`~zigllama_batch.batching.model_drafter.ModelDrafter`); the step verifies them
(``Engine.step``), and :meth:`Speculation.observe` follows what was accepted. The rule, from
measurement (``benchmarks/speculative.py``): a step's cost grows with its rows, so drafting
pays while the batch is small, where a step is bound by reading the weights and a few more
rows cost little; beyond ``speculative_max_batch`` decoding sequences nothing is drafted. A
sequence drafts at most ``speculative_tokens`` tokens, fewer after its drafts were rejected
(each drafter's :class:`~zigllama_batch.engine.drafts.DraftPace` for the sequence), never past
its ``max_tokens`` or its cache slot, and drafts share what the step's token budget leaves
after every sequence's own token.

Prompt lookup goes first because it is free (a dictionary lookup, no forward pass) and, where
it matches, is right most of the time (copying work: 85-97% of drafted tokens accepted on the
default model); the draft model costs a forward pass of its own per drafted token, so it
drafts only for sequences whose lookup found nothing or is paused after poor drafts (open-ended
text, mostly).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.drafts import PromptLookup
from ..engine.step import SequenceStep, TokenSample
from .model_drafter import ModelDrafter
from .request import TrackedRequest
from .types import BatchConfig

__all__ = ["Speculation"]


class Speculation:
    """Drafts for one processor's sequences (event loop only)."""

    def __init__(
        self, config: BatchConfig, max_context: int, model: ModelDrafter | None = None
    ) -> None:
        """Args:
        config: the processor's settings (``speculative_tokens``, ``speculative_max_batch``).
        max_context: positions of a target cache slot.
        model: the draft model's drafter, when the processor has a draft model.
        """
        self.most = config.speculative_tokens
        self.max_batch = config.speculative_max_batch
        self.max_context = max_context
        self.model = model
        self._lookups: dict[TrackedRequest, PromptLookup] = {}

    async def drafts(
        self, running: Sequence[TrackedRequest], budget: int
    ) -> dict[TrackedRequest, list[int]]:
        """Drafted tokens for the decoding sequences of ``running``, at most ``budget`` in
        all (the step's token budget after every sequence's own tokens). The draft model's,
        if any are asked of it, are computed in the step thread."""
        decoding = [r for r in running if not r.seq.prefilling and not r.finished]
        if not self.most or not decoding or len(decoding) > self.max_batch:
            return {}
        out: dict[TrackedRequest, list[int]] = {}
        wanted: list[tuple[TrackedRequest, int]] = []  # what the draft model is asked for
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
            elif self.model is not None and (k := self.model.allow(rec, room)):
                wanted.append((rec, k))
                budget -= k
        if wanted:
            assert self.model is not None
            out.update(await self.model.propose(wanted))
        return out

    def observe(self, rec: TrackedRequest, step: SequenceStep, out: TokenSample) -> None:
        """A step of ``rec`` ran and gave ``out``: follow its new tokens and its drafts'
        outcome."""
        by_model = self.model is not None and self.model.observe(rec, step, out)
        lookup = self._lookups.get(rec)
        if lookup is None:
            return
        if step.draft and not by_model:
            lookup.record(step.draft, len(out.accepted), self.most)
        lookup.extend(sample.token_id for sample in out.each())

    def forget(self, rec: TrackedRequest) -> None:
        """``rec`` left the batch (finished, cancelled, or preempted: its lookup is rebuilt
        if it returns, and the draft model catches up on it again)."""
        self._lookups.pop(rec, None)
        if self.model is not None:
            self.model.forget(rec)

    @property
    def draft_slots(self) -> int:
        """Draft-model cache slots held by sequences (0 without a draft model)."""
        return 0 if self.model is None else self.model.slots_in_use

    def close(self) -> None:
        """Give the draft model's memory back (no sequence runs, and none will)."""
        self._lookups.clear()
        if self.model is not None:
            self.model.close()

    def _lookup(self, rec: TrackedRequest) -> PromptLookup:
        lookup = self._lookups.get(rec)
        if lookup is None:
            history = [*rec.prompt_ids, *rec.decoder.token_ids]
            lookup = self._lookups[rec] = PromptLookup(history, limit=self.most)
        return lookup

    def __repr__(self) -> str:
        return f"Speculation(tokens={self.most}, max_batch={self.max_batch}, model={self.model!r})"
