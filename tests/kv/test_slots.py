"""The slot table: which KV-cache slots are held, apart from the cache's storage."""

from __future__ import annotations

import pytest

from zigllama_batch.kv.slots import SlotTable


def test_slot_table_hands_out_lowest_free_slot() -> None:
    """Slots are allocated lowest first, freed ones are reused, and misuse raises."""
    slots = SlotTable(3)
    assert [slots.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError):
        slots.allocate()
    slots.free(1)
    assert (slots.n_free, slots.n_used) == (1, 2)
    assert slots.allocate() == 1
    with pytest.raises(ValueError, match="not allocated"):
        slots.free(1) or slots.free(1)
    with pytest.raises(ValueError, match="not allocated"):
        slots.free(7)


def test_slot_table_needs_a_positive_size() -> None:
    """A table of no slots (or not an int) is refused, naming n_slots."""
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_slots"):
            SlotTable(bad)  # type: ignore[arg-type]
