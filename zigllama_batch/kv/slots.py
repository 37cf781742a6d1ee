"""Which KV-cache slots hold a sequence: pure bookkeeping, apart from the cache's storage.

Inside: :class:`SlotTable`. The storage (:class:`~zigllama_batch.kv.storage.KVCache`) is
arrays that steps write in place; who may use which slot is decided here, without touching
them, by one owner (the :class:`~zigllama_batch.kv.KVManager` on the event loop, or a
:class:`~zigllama_batch.generator.TextGenerator`).
"""

from __future__ import annotations

import heapq

__all__ = ["SlotTable"]


class SlotTable:
    """Free and used slots of a cache of ``n_slots`` sequences; the lowest free slot goes first,
    so running sequences sit in neighbouring slots (the front of the cache stays the part in
    use)."""

    def __init__(self, n_slots: int) -> None:
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots: must be an int >= 1, got {n_slots!r}")
        self.n_slots = n_slots
        self._free: list[int] = list(range(n_slots))  # a heap
        self._used: set[int] = set()

    @property
    def n_free(self) -> int:
        """Slots not held by any sequence."""
        return len(self._free)

    @property
    def n_used(self) -> int:
        """Slots held by sequences."""
        return len(self._used)

    def allocate(self) -> int:
        """Take the lowest free slot.

        Raises:
            RuntimeError: no slot is free; callers check :attr:`n_free` first.
        """
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def take(self, slot: int) -> None:
        """Take a given free slot (one that already holds a wanted prefix, say).

        Raises:
            ValueError: the slot is not free.
        """
        if slot in self._used or not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is not free")
        self._free.remove(slot)
        heapq.heapify(self._free)
        self._used.add(slot)

    def is_free(self, slot: int) -> bool:
        """Whether ``slot`` is free."""
        return 0 <= slot < self.n_slots and slot not in self._used

    def free_slots(self) -> list[int]:
        """The free slots, lowest first."""
        return sorted(self._free)

    def free(self, slot: int) -> None:
        """Give a slot back; the next sequence in it overwrites its stale contents.

        Raises:
            ValueError: the slot is not allocated (freed twice, or never taken).
        """
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def __repr__(self) -> str:
        return f"SlotTable(slots={self.n_slots}, used={self.n_used})"
