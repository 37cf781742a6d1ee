"""The KV manager: the one owner of key/value memory, as the scheduler sees it.

Inside: :class:`KVManager`, :class:`KVStats` and :class:`KVEngine` (what the manager needs of
an engine: its slots, the pool's storage, and pages given back). The scheduler asks it to
:meth:`~KVManager.allocate` a slot for an admitted sequence (with the prefix it can reuse), to
make room for a step (:meth:`~KVManager.fit_step`, which names the sequences to preempt when
the budget is spent), to :meth:`~KVManager.free` a sequence's slot, to
:meth:`~KVManager.preempt` one, or to :meth:`~KVManager.rollback` its last positions; it reads
:meth:`~KVManager.stats`. A step carries only a slot number and an opaque
:class:`~zigllama_batch.kv.storage.Transfer`.

Memory: every position a sequence holds counts against a budget in tokens (``budget_bytes``
over the bytes one position takes, all layers), together with the prefixes that free slots
keep for reuse; the pool of evicted prefixes has its own bound inside the budget. Admission is
optimistic, as in vLLM: a sequence is admitted when its prompt fits, and grows a step at a
time. When the running sequences' next step does not fit, cached prefixes of free slots are
dropped first (least recently used first, their pages given back to the OS), then running
sequences are preempted (the lowest priority, then the most recently admitted), to be
recomputed when they are admitted again. Slot storage is virtual until written, so slots cost
nothing until used.

Left out: preemption by swapping keys and values to host memory (recompute only); blocks
shared between running sequences without a copy (a reused prefix is copied into the slot).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from .placement import Occupant, Placement, PlainPlacement, PrefixPlacement, StepParts

if TYPE_CHECKING:
    from ..engine.step import SequenceStep

__all__ = ["KVEngine", "KVManager", "KVStats", "default_budget_bytes"]

Occ = TypeVar("Occ", bound=Occupant)

DEFAULT_BUDGET_SHARE = 0.5
"""Share of the memory available (after the weights are loaded) that key/value memory may take
by default: room is left for the host application, the allocator and a second process."""


def default_budget_bytes() -> int:
    """Half of the memory the OS says is available now (``MemAvailable``; on systems without
    it, half of the free physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * DEFAULT_BUDGET_SHARE)
    except OSError:
        pass
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * DEFAULT_BUDGET_SHARE)


class KVEngine(Protocol):
    """What the KV manager needs of an engine (:class:`~zigllama_batch.engine.Engine` has it)."""

    @property
    def n_slots(self) -> int:
        """Slots: the most sequences held at once."""
        ...

    @property
    def max_context(self) -> int:
        """Positions one slot holds."""
        ...

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one position takes, all layers together."""
        ...

    def reserve_pool(self, n_blocks: int, block_tokens: int) -> None:
        """Reserve storage for the pool of evicted prefixes."""
        ...

    def release_kv(self, slot: int, keep: int) -> None:
        """Give the memory of ``slot``'s positions from ``keep`` on back (the slot is not in a
        running step)."""
        ...


@dataclass(frozen=True, slots=True)
class KVStats:
    """Key/value memory now, in tokens and bytes."""

    budget_tokens: int
    """Positions the budget holds in slots (the pool's share apart)."""
    budget_bytes: int
    """All key/value memory allowed: slots and pool."""
    used_tokens: int
    """Positions held: by running sequences, and prefixes kept by free slots."""
    running_tokens: int
    """Positions held by running sequences."""
    cached_tokens: int
    """Positions of prefixes kept by free slots for reuse."""
    slots_used: int
    """Slots held by sequences."""
    slots: int
    """All slots."""
    pool_bytes: int
    """Bytes of the pool of evicted prefixes in use."""
    pool_evictions: int
    """Pool blocks dropped to make room for others."""
    pins: int
    """Pending copies out of slots or pool blocks."""
    preemptions: int
    """Sequences preempted so far."""
    bytes_per_token: int
    """Bytes one position takes, all layers."""

    @property
    def usage(self) -> float:
        """Share of the budget in use (0 to 1)."""
        held = self.used_tokens * self.bytes_per_token + self.pool_bytes
        return held / self.budget_bytes if self.budget_bytes else 0.0


class KVManager:
    """Slots, prefix reuse, the pool and the memory budget (event loop only)."""

    def __init__(
        self,
        engine: KVEngine,
        *,
        budget_bytes: int,
        prefix_cache: bool,
        pool_bytes: int,
        on_lookup: Callable[[int, int], None],
    ) -> None:
        """Args:
        engine: the engine whose storage this manages.
        budget_bytes: all key/value memory allowed (slots and pool).
        prefix_cache: reuse computed prefixes (keep them in free slots and the pool).
        pool_bytes: the pool's bound, taken from the budget (0: no pool).
        on_lookup: told of each prefix lookup (prompt tokens, tokens found cached).

        Raises:
            ValueError: the budget does not hold one position beside the pool.
        """
        self.engine = engine
        self.bytes_per_token = max(1, engine.kv_bytes_per_token)
        pool_bytes = pool_bytes if prefix_cache else 0
        self.budget_bytes = budget_bytes
        self.budget_tokens = (budget_bytes - pool_bytes) // self.bytes_per_token
        if self.budget_tokens < 1:
            raise ValueError(
                f"kv budget: {budget_bytes} bytes hold no position beside the pool's "
                f"{pool_bytes} (one position takes {self.bytes_per_token})"
            )
        self.placement: Placement = PlainPlacement(engine.n_slots)
        if prefix_cache:
            prefix = PrefixPlacement(
                engine.n_slots,
                engine.max_context,
                on_lookup,
                pool_bytes=pool_bytes,
                bytes_per_token=self.bytes_per_token,
            )
            pool = prefix.prefixes.pool
            if pool.n_blocks:
                engine.reserve_pool(pool.n_blocks, pool.block_tokens)
            self._prefix: PrefixPlacement | None = prefix
            self.placement = prefix
        else:
            self._prefix = None
        self.slots = self.placement.slots
        n = engine.n_slots
        self._held = [0] * n  # positions each running sequence's slot holds
        # Slots whose earlier contents past the given position go back after the next step.
        self._stale: dict[int, int] = {}
        self.preemptions = 0

    # -- what the scheduler asks ---------------------------------------------------------------

    @property
    def prefers(self) -> bool:
        """Whether :meth:`preference` can be anything but 0."""
        return self.placement.prefers

    def capacity(self) -> int:
        """How many more sequences may take a slot now (memory aside)."""
        return self.placement.capacity()

    def preference(self, rec: Occupant) -> int:
        """Prompt tokens ``rec`` would find cached (0 without prefix reuse)."""
        return self.placement.preference(rec)

    def allocate(self, rec: Occupant, batch: Sequence[Occupant]) -> bool:
        """Give ``rec`` a slot, and the prefix it can reuse, if its prompt fits in the budget
        now (dropping cached prefixes of free slots to make room); False, with nothing
        changed, when it does not (``batch``: its worker's running sequences)."""
        need = len(rec.seq.prompt_ids)
        if self._running_tokens() + self._pinned_tokens() + need > self.budget_tokens:
            return False
        self.placement.place(rec, batch)
        slot = rec.seq.slot
        self._held[slot] = need
        # What an earlier sequence left past the new prompt goes back (the prompt's own pages
        # are about to be written again: kept, they save as many page faults).
        if self.placement.left > need:
            if rec.seq.transfer is not None and rec.seq.transfer.save is not None:
                self._stale[slot] = need  # after the first step, which saves it to the pool
            else:
                self.engine.release_kv(slot, need)
        self._trim()
        return True

    def fit_step(
        self, batch: Sequence[Occ], parts: Sequence[tuple[Occ, SequenceStep]]
    ) -> list[Occ]:
        """Make room for the new positions of a step built from ``batch``: drop cached
        prefixes of free slots, least recently used first. The sequences of ``batch`` to
        preempt (then :meth:`preempt` each and rebuild the step) when that is not enough: the
        lowest priority, then the most recently admitted, until the rest fit (one is always
        left to run); empty when the step fits."""
        held = self._held
        for _, step in parts:
            end = step.start_pos + len(step.token_ids)
            if end > held[step.slot]:
                held[step.slot] = end
        running = sum(held)
        if running <= self.budget_tokens and self._prefix is None:
            return []  # (the common case: no cached prefixes to weigh)
        self._trim()
        # Left after the trim: prefixes a pending copy reads (a preempted copier frees them).
        over = running + self._cached_tokens() - self.budget_tokens
        if over <= 0:
            return []
        victims: list[Occ] = []
        order = sorted(batch, key=lambda r: (r.priority, r.admitted or 0.0), reverse=True)
        for rec in order[:-1]:
            victims.append(rec)
            over -= self._held[rec.seq.slot]
            if over <= 0:
                break
        return victims

    def preempt(self, rec: Occupant) -> None:
        """Take ``rec``'s slot away; its sequence starts over from its prompt and output so
        far when it is admitted again."""
        self.free(rec, keep=False)
        rec.seq.restart()
        self.preemptions += 1

    def rollback(self, rec: Occupant, n: int) -> None:
        """Forget the last ``n`` positions of ``rec``'s sequence (drafted tokens that were not
        accepted): they are never reused as a prefix.

        Raises:
            ValueError: it holds fewer than ``n`` positions.
        """
        slot = rec.seq.slot
        rec.seq.rollback(n)
        self._held[slot] = rec.seq.num_computed
        if self._prefix is not None:
            self._prefix.prefixes.truncate(slot, rec.seq.num_computed)

    def before_step(self, batch: Sequence[Occupant]) -> None:
        """Last changes before a step is built from ``batch`` (waiting prefixes start)."""
        self.placement.before_step(batch)

    def after_step(self, parts: StepParts) -> None:
        """A step ran: its items wrote their positions (and made their transfers)."""
        self.placement.after_step(parts)
        for _, step in parts:
            if (keep := self._stale.pop(step.slot, None)) is not None:
                self.engine.release_kv(step.slot, keep)

    def step_failed(self, parts: StepParts) -> None:
        """A step raised: what it wrote is unknown."""
        self.placement.step_failed(parts)

    def free(self, rec: Occupant, *, keep: bool = True) -> None:
        """``rec`` leaves its slot (it ended, is done generating, or is preempted); what it
        computed stays for reuse when prefixes are cached and ``keep``, else its memory is
        given back."""
        slot = rec.seq.slot
        self.placement.release(rec)
        self._held[slot] = 0
        self._stale.pop(slot, None)
        if self._prefix is None:
            self.engine.release_kv(slot, 0)
        elif not keep and not self._prefix.prefixes.is_pinned(slot):
            self._prefix.prefixes.truncate(slot, 0)
            self.engine.release_kv(slot, 0)
        else:  # kept for reuse (or read by a pending copy): dropped when memory is short
            self._trim()

    def close(self) -> None:
        """Give every slot's memory back and drop every cached prefix (no sequence runs, and
        none will)."""
        for slot in range(self.slots.n_slots):
            if self._prefix is not None:
                self._prefix.prefixes.truncate(slot, 0)
            self.engine.release_kv(slot, 0)
        self._stale.clear()

    @property
    def pins(self) -> int:
        """Pending copies out of slots or pool blocks."""
        return self.placement.pins

    def stats(self) -> KVStats:
        """Memory now (cheap: no scan of the cache)."""
        running = self._running_tokens()
        cached = self._cached_tokens()
        pool_bytes, evictions = self.placement.pool
        return KVStats(
            budget_tokens=self.budget_tokens,
            budget_bytes=self.budget_bytes,
            used_tokens=running + cached,
            running_tokens=running,
            cached_tokens=cached,
            slots_used=self.slots.n_used,
            slots=self.slots.n_slots,
            pool_bytes=pool_bytes,
            pool_evictions=evictions,
            pins=self.pins,
            preemptions=self.preemptions,
            bytes_per_token=self.bytes_per_token,
        )

    def check(self, *, idle: bool = False) -> None:
        """Assert the bookkeeping's invariants: positions held within the budget, and the
        pool's tree whole. With ``idle`` (no request running): no slot
        used, nothing pinned, nothing held by a running sequence."""
        s = self.stats()
        assert s.used_tokens <= self.budget_tokens, s
        if self._prefix is not None:
            self._prefix.prefixes.pool.check(idle=idle)
        if idle:
            assert s.slots_used == 0, s
            assert s.pins == 0, s
            assert s.running_tokens == 0, s

    # -- inside --------------------------------------------------------------------------------

    def _running_tokens(self) -> int:
        return sum(self._held)

    def _cached(self, slot: int) -> int:
        """Positions a free slot keeps for reuse."""
        return 0 if self._prefix is None else self._prefix.prefixes.held(slot)

    def _cached_tokens(self) -> int:
        return sum(self._cached(s) for s in self.slots.free_slots())

    def _pinned_tokens(self) -> int:
        """Positions of free slots that a pending copy reads (they cannot be dropped yet)."""
        if self._prefix is None:
            return 0
        prefixes = self._prefix.prefixes
        return sum(prefixes.held(s) for s in self.slots.free_slots() if prefixes.is_pinned(s))

    def _trim(self) -> None:
        """Drop cached prefixes of free slots (least recently used first; not those a pending
        copy reads) until running sequences and cached prefixes fit in the budget."""
        if self._prefix is None:
            return
        over = self._running_tokens() + self._cached_tokens() - self.budget_tokens
        if over <= 0:
            return
        prefixes = self._prefix.prefixes
        for slot in prefixes.by_age(self.slots.free_slots()):
            held = prefixes.held(slot)
            if not held or prefixes.is_pinned(slot):
                continue
            prefixes.truncate(slot, 0)
            self.engine.release_kv(slot, 0)
            over -= held
            if over <= 0:
                return

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"KVManager(slots={s.slots_used}/{s.slots}, tokens={s.used_tokens}/"
            f"{s.budget_tokens}, preemptions={s.preemptions})"
        )
