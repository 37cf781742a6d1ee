"""Where an admitted request's sequence goes: which KV-cache slot, and which prompt tokens it can
skip because their keys and values are already computed.

Inside: :class:`Placement` (what the scheduler asks), :class:`PlainPlacement` (the lowest free
slot, every prompt computed in full) and :class:`PrefixPlacement` (prefix reuse). The scheduler
calls these at fixed points of its loop (admission, before and after each step, when a slot is
freed) and never branches on whether prefixes are reused.

Prefix reuse, as :class:`PrefixPlacement` does it: the prompt is matched against what every
slot holds (:class:`~zigllama_batch.kv.prefix_cache.PrefixCache`); a free slot holding the
longest prefix is taken in place; otherwise the least valuable free slot is taken and the
request's first step copies the prefix from the slot holding it, which stays pinned until the
copy ran. A request whose prompt shares a longer prefix with a sequence of the same worker
still computing it waits (no step budget spent) and copies once it is computed, so a burst of
requests with one system prompt computes it once. A request whose prompt is scored (prompt
logprobs) reuses nothing: a cached prefix has no logits. Among waiting requests of one aged
priority level, those with cached prefixes are admitted first
(:meth:`PrefixPlacement.preference`). What a slot held before a new sequence overwrites it goes
to a bounded host-memory pool (its first step saves it), where later prompts find it as they
find slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from .prefix_cache import PrefixCache, PrefixMatch
from .slots import SlotTable
from .storage import Transfer

if TYPE_CHECKING:
    from ..engine.step import SequenceState, SequenceStep

__all__ = ["MIN_WAIT_TOKENS", "Occupant", "Placement", "PlainPlacement", "PrefixPlacement"]

MIN_WAIT_TOKENS = 16
"""A request waits for a prefix still being computed by another only if that saves at least
this many tokens over what is cached already (less is cheaper to compute than to wait for)."""


class Occupant(Protocol):
    """What placement reads and sets on an admitted request that occupies a slot (the batch
    processor's ``TrackedRequest`` is one)."""

    seq: SequenceState
    awaits: tuple[Any, int] | None
    """A sequence of the same batch (an ``Occupant``) computing a longer prefix of this
    prompt, and that prefix's length: this one starts once it is computed."""
    cached_tokens: int

    @property
    def prompt_ids(self) -> Sequence[int]:
        """The request's prompt (the sequence's own may be longer once preempted)."""
        ...

    @property
    def priority(self) -> int:
        """Lower is served first."""
        ...

    @property
    def admitted(self) -> float | None:
        """When it was first admitted."""
        ...

    @property
    def finished(self) -> bool:
        """The request has its outcome."""
        ...

    @property
    def cache_salt(self) -> str | None:
        """Prefixes are shared only between requests of the same salt."""
        ...


StepParts = Sequence[tuple[Occupant, "SequenceStep"]]


class Placement(Protocol):
    """Slot bookkeeping as the scheduler sees it (event loop only)."""

    slots: SlotTable
    prefers: bool
    """Whether :meth:`preference` can be anything but 0 (else admission need not ask)."""
    left: int
    """Positions the slot :meth:`place` gave last held from an earlier sequence."""
    kept: int
    """How many of them the new sequence keeps in place (a reused prefix)."""

    def capacity(self) -> int:
        """How many more requests can be placed now."""
        ...

    def place(self, rec: Occupant, batch: Sequence[Occupant]) -> None:
        """Give an admitted request its slot (``batch``: its worker's running sequences)."""
        ...

    def preference(self, rec: Occupant) -> int:
        """How much cheaper a waiting request would be to start now (its cached prompt
        tokens); 0 when nothing is cached."""
        ...

    def before_step(self, batch: Sequence[Occupant]) -> None:
        """Last changes before a step is built from ``batch``."""
        ...

    def after_step(self, parts: StepParts) -> None:
        """A step ran: its items wrote their tokens' keys and values."""
        ...

    def step_failed(self, parts: StepParts) -> None:
        """A step raised: what it wrote is unknown."""
        ...

    def release(self, rec: Occupant) -> None:
        """A request leaves its slot (it ended, or is done generating)."""
        ...

    @property
    def pins(self) -> int:
        """Pending copies out of slots (0 without prefix reuse)."""
        ...

    @property
    def pool(self) -> tuple[int, int]:
        """Bytes in the prefix pool, and blocks evicted from it so far."""
        ...


class PlainPlacement:
    """The lowest free slot; every prompt computed in full."""

    prefers = False
    left = kept = 0  # a freed slot's memory is given back at once

    def __init__(self, n_slots: int) -> None:
        self.slots = SlotTable(n_slots)

    def capacity(self) -> int:
        return self.slots.n_free

    def place(self, rec: Occupant, batch: Sequence[Occupant]) -> None:
        rec.seq.slot = self.slots.allocate()

    def preference(self, rec: Occupant) -> int:
        return 0

    def before_step(self, batch: Sequence[Occupant]) -> None:
        pass

    def after_step(self, parts: StepParts) -> None:
        pass

    def step_failed(self, parts: StepParts) -> None:
        pass

    def release(self, rec: Occupant) -> None:
        self.slots.free(rec.seq.slot)

    @property
    def pins(self) -> int:
        return 0

    @property
    def pool(self) -> tuple[int, int]:
        return 0, 0


class PrefixPlacement:
    """Slots chosen, and prompts started, by the longest cached prefix (module docstring)."""

    prefers = True

    def __init__(
        self,
        n_slots: int,
        max_context: int,
        on_lookup: Callable[[int, int], None],
        *,
        pool_bytes: int = 0,
        bytes_per_token: int = 0,
    ) -> None:
        """Args:
        n_slots: cache slots.
        max_context: positions per slot.
        on_lookup: told of each prefix lookup (prompt tokens, tokens found cached).
        pool_bytes: bound of the host-memory pool of evicted prefixes (0: none).
        bytes_per_token: keys and values of one position.
        """
        self.slots = SlotTable(n_slots)
        self.prefixes = PrefixCache(
            n_slots, max_context, pool_bytes=pool_bytes, bytes_per_token=bytes_per_token
        )
        self.on_lookup = on_lookup
        self.left = self.kept = 0

    def capacity(self) -> int:
        # A free slot a pending copy reads from is not free to take.
        return self.prefixes.n_unpinned(self.slots.free_slots())

    def place(self, rec: Occupant, batch: Sequence[Occupant]) -> None:
        salt = rec.cache_salt
        found = self.prefixes.match(rec.seq.prompt_ids, salt, free=self.slots.free_slots())
        reuse = min(found.length, _most_reused(rec))
        rec.awaits = self._in_flight(rec, batch, reuse) if rec.seq.may_reuse_prefix else None
        in_place = (
            rec.awaits is None
            and reuse > 0
            and self.slots.is_free(found.slot)
            and not self.prefixes.is_pinned(found.slot)
        )
        slot = found.slot if in_place else self.prefixes.pick_free(self.slots.free_slots())
        self.slots.take(slot)
        rec.seq.slot = slot
        keep = reuse if in_place else 0
        self.left, self.kept = self.prefixes.held(slot), keep
        if found.blocks:  # the pool blocks this request copies must survive the save
            self.prefixes.pin_pool(found.blocks)
        save = self.prefixes.plan_save(slot, keep)  # before it is overwritten
        rec.seq.transfer = None if save is None else Transfer(save=save)
        if found.blocks:
            self.prefixes.unpin_pool(found.blocks)
        self.prefixes.assign(slot, salt, keep=keep, planned=rec.seq.prompt_ids)
        if rec.awaits is None:
            self._reuse(rec, found, reuse, in_place=in_place)

    def preference(self, rec: Occupant) -> int:
        if not rec.seq.may_reuse_prefix:
            return 0
        found = self.prefixes.match(rec.seq.prompt_ids, rec.cache_salt)
        return min(found.length, _most_reused(rec))

    def before_step(self, batch: Sequence[Occupant]) -> None:
        """Requests waiting for a prefix in flight start once it is computed (or once the
        sequence computing it has ended), from the longest prefix held by then."""
        for rec in batch:
            if rec.awaits is None or rec.finished:
                continue
            source, target = rec.awaits
            computing = source.seq.slot >= 0 and source.seq.prefilling  # (not preempted)
            if not source.finished and computing and source.seq.num_computed < target:
                continue  # still computing it
            rec.awaits = None
            found = self.prefixes.match(rec.seq.prompt_ids, rec.cache_salt)
            self._reuse(rec, found, min(found.length, _most_reused(rec)), in_place=False)

    def after_step(self, parts: StepParts) -> None:
        for rec, step in parts:  # whatever became of the request, the step wrote these
            t = step.transfer
            if t is not None and t.save is not None:
                self.prefixes.saved(t.save)
            if t is not None and (t.from_slot is not None or t.from_pool is not None):
                self.prefixes.record(step.slot, 0, rec.seq.prompt_ids[: step.start_pos])
            self.prefixes.record(step.slot, step.start_pos, step.token_ids)
            self._copied(rec, ran=True)

    def step_failed(self, parts: StepParts) -> None:
        for rec, step in parts:
            if step.transfer is not None and step.transfer.save is not None:
                self.prefixes.forget(step.transfer.save)  # saved or not, it is not to be trusted
            self._copied(rec, ran=False)
            self.prefixes.assign(step.slot, None, keep=0)

    def release(self, rec: Occupant) -> None:
        self._copied(rec, ran=False)  # ended before its first step: its copies will not run
        if rec.awaits is not None:  # ended while waiting for a prefix: a lookup all the same
            rec.awaits = None
            if not rec.seq.restarts:
                self.on_lookup(len(rec.prompt_ids), 0)
        self.prefixes.release(rec.seq.slot)
        self.slots.free(rec.seq.slot)

    @property
    def pins(self) -> int:
        return self.prefixes.pins

    @property
    def pool(self) -> tuple[int, int]:
        return self.prefixes.pool_bytes, self.prefixes.evictions

    def _in_flight(
        self, rec: Occupant, batch: Sequence[Occupant], cached: int
    ) -> tuple[Occupant, int] | None:
        """A sequence of ``batch`` still computing a prefix of ``rec``'s prompt at least
        ``MIN_WAIT_TOKENS`` longer than the ``cached`` one, and that prefix's length. Only the
        same worker's batch: its steps are the ones the waiting request skips."""
        ahead = self.prefixes.match(rec.seq.prompt_ids, rec.cache_salt, planned=True)
        target = min(ahead.length, len(rec.seq.prompt_ids) - 1)
        if target < cached + MIN_WAIT_TOKENS:
            return None
        for other in batch:
            if other.seq.slot == ahead.slot and not other.finished and other.seq.prefilling:
                return other, target
        return None

    def _reuse(self, rec: Occupant, found: PrefixMatch, n: int, *, in_place: bool) -> None:
        """Start ``rec`` after ``n`` prompt tokens held where ``found`` says (its own slot when
        ``in_place``, else copied by its first step from the slot or pool blocks, pinned until
        then)."""
        if n:
            rec.seq.reuse_prefix(n)
        transfer = rec.seq.transfer or Transfer()
        if n and not in_place and found.blocks:
            rec.seq.transfer = replace(transfer, from_pool=found.blocks)
            self.prefixes.pin_pool(found.blocks)
        elif n and not in_place:
            rec.seq.transfer = replace(transfer, from_slot=found.slot)
            self.prefixes.pin(found.slot)
        if not rec.seq.restarts:  # a preempted sequence's second admission is not a new lookup
            rec.cached_tokens = n
            self.on_lookup(len(rec.prompt_ids), n)

    def _copied(self, rec: Occupant, *, ran: bool) -> None:
        """The copies a request's first step was to make are done (``ran``), or will never be
        made."""
        t, rec.seq.transfer = rec.seq.transfer, None
        if t is None:
            return
        if t.from_slot is not None:
            self.prefixes.unpin(t.from_slot)
        if t.from_pool is not None:
            self.prefixes.unpin_pool(t.from_pool)
        if t.save is not None and not ran:  # the slot still holds it; no save
            self.prefixes.forget(t.save)


def _most_reused(rec: Occupant) -> int:
    """Most prompt tokens ``rec`` may take from a cached prefix: all but the last (whose logits
    give the first token), or none while its prompt is scored (every position's logits count)."""
    return len(rec.seq.prompt_ids) - 1 if rec.seq.may_reuse_prefix else 0
