"""The draft model's side of speculative decoding, kept on the event loop: which draft slot each
sequence holds, how much of the sequence that slot holds, and what a verification leaves of it.

Inside: :class:`ModelDrafter`. The first time a sequence drafts with the draft model it takes a
slot of the draft model's own cache
(:class:`~zigllama_batch.engine.draft_model.DraftModel`, a few slots:
``speculative_max_batch`` per worker, since no more sequences draft at once). Before each
proposal it feeds the tokens its slot does not hold yet: its whole prompt the first time, at
most ``prefill_chunk`` tokens a call and ``max_step_tokens`` over all sequences of a call (so
a long prompt delays one step by a bounded draft-model prefill, and drafts a few steps later),
then only what was accepted since. The proposal runs in the step thread
(:meth:`~zigllama_batch.batching.executor.StepExecutor.call`), never on the event loop, as
its own call just before the step that verifies it. After the step, the slot keeps the drafted
tokens that were accepted (its positions past them are overwritten by the next feed: rolling
back is bookkeeping only); when the sequence leaves (finished, cancelled, preempted), its slot
and the slot's memory are given back.

Left out: the draft model's keys and values counted in ``kv_cache_mb`` (its cache is a few
slots, mapped as written), and feeding the draft model during the target's prefill (it catches
up when the sequence first drafts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..engine.draft_model import DraftItem, DraftModel
from ..engine.drafts import DraftPace
from ..engine.step import SequenceStep, TokenSample
from ..kv.slots import SlotTable
from .executor import StepExecutor
from .request import TrackedRequest

__all__ = ["ModelDrafter"]


@dataclass(slots=True)
class _Drafting:
    """One sequence's state in the draft model."""

    slot: int
    pace: DraftPace
    held: int = 0
    """Positions of the slot that hold the sequence's own tokens."""
    fed: list[int] = field(default_factory=list)
    """Drafted tokens the last proposal fed past them (all its drafts but the last)."""
    proposed: int = 0
    """Tokens the last proposal drafted, until the step that verifies them has run."""


class ModelDrafter:
    """Drafts of one processor's sequences from a draft model (event loop only)."""

    def __init__(
        self,
        model: DraftModel,
        executor: StepExecutor,
        fail: Callable[[Sequence[TrackedRequest], str, Exception], None],
        *,
        most: int,
        chunk: int,
        budget: int,
    ) -> None:
        """Args:
        model: the draft model, with its cache.
        executor: where its proposals run (the step thread).
        fail: ends requests whose proposal raised (with a reason, and the exception).
        most: the most tokens one draft may have (``speculative_tokens``).
        chunk: the most tokens one sequence feeds in a call (``prefill_chunk``).
        budget: the most tokens all sequences feed in a call (``max_step_tokens``).
        """
        self.model = model
        self.most = most
        self.chunk = chunk
        self.budget = budget
        self._executor = executor
        self._fail = fail
        self._slots = SlotTable(model.n_slots)
        self._sequences: dict[TrackedRequest, _Drafting] = {}

    @property
    def slots_in_use(self) -> int:
        """Draft-model slots held by sequences."""
        return self._slots.n_used

    def allow(self, rec: TrackedRequest, room: int) -> int:
        """How many tokens the draft model may draft for ``rec`` now: at most ``room``, what
        its draft slot holds and its pace allows; 0 while its pace pauses or when no draft
        slot is free. Its first call takes it a draft slot."""
        room = min(room, self.model.max_context - rec.seq.length + 1)  # drafts fed but the last
        if room <= 0:
            return 0
        state = self._sequences.get(rec)
        if state is None:
            if not self._slots.n_free:
                return 0
            state = _Drafting(self._slots.allocate(), DraftPace(self.most))
            self._sequences[rec] = state
        return state.pace.allow(room)

    async def propose(
        self, wanted: Sequence[tuple[TrackedRequest, int]]
    ) -> dict[TrackedRequest, list[int]]:
        """Drafts for ``wanted`` (each a sequence :meth:`allow` gave tokens, and how many), in
        one call of the step thread; a sequence still catching up on its prompt gets none.
        When the draft model raises, the requests of the call end with a GenerationError (as
        those of a failed step do) and get none; what each slot holds stays as before the
        call, since a feed writes only past it."""
        budget = self.budget
        items: list[DraftItem] = []
        owners: list[tuple[TrackedRequest, _Drafting]] = []
        for rec, k in wanted:
            state = self._sequences[rec]
            feed = rec.seq.tokens_from(state.held)
            most = min(self.chunk, budget)
            if len(feed) > most:  # a chunk of a long catch-up: drafts on a later step
                feed, k = feed[:most], 0
            if not feed:
                continue
            items.append(DraftItem(state.slot, feed, state.held, k))
            owners.append((rec, state))
            budget -= len(feed)
        try:
            drafts = await self._executor.call(self.model.propose, items)
        except Exception as exc:
            self._fail([rec for rec, _ in owners], "the draft model's step failed", exc)
            return {}
        out: dict[TrackedRequest, list[int]] = {}
        for (rec, state), item, draft in zip(owners, items, drafts, strict=True):
            state.held += len(item.token_ids)
            state.fed = draft[:-1]
            state.proposed = len(draft)
            if draft:
                out[rec] = draft
        return out

    def observe(self, rec: TrackedRequest, step: SequenceStep, out: TokenSample) -> bool:
        """A step of ``rec`` ran and gave ``out``: keep the drafted positions it accepted, and
        follow how its drafts do. True when the step verified the draft model's draft."""
        state = self._sequences.get(rec)
        if state is None:
            return False
        ours = bool(state.proposed and step.draft)
        if ours:
            state.pace.record(step.draft, len(out.accepted), self.most)
        # The slot holds the sequence's tokens, then `fed`: keep those the sequence now has.
        # The last new token is never kept, so the next proposal has a position to draft from.
        new = [sample.token_id for sample in out.each()]
        fed, kept = state.fed, 0
        while kept < min(len(fed), len(new) - 1) and fed[kept] == new[kept]:
            kept += 1
        state.held += kept
        state.fed, state.proposed = [], 0
        return ours

    def forget(self, rec: TrackedRequest) -> None:
        """``rec`` left its batch (finished, cancelled or preempted): its draft slot and that
        slot's memory are given back."""
        state = self._sequences.pop(rec, None)
        if state is not None:
            self._slots.free(state.slot)
            self.model.release(state.slot)

    def close(self) -> None:
        """Give every slot's memory back (no sequence runs, and none will)."""
        for rec in list(self._sequences):
            self.forget(rec)

    def __repr__(self) -> str:
        return (
            f"ModelDrafter({self.model.model_name}, slots={self.slots_in_use}/{self.model.n_slots})"
        )
