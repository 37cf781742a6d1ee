"""ResponseStore: bounded, least recently used first out, reading counts as use."""

from __future__ import annotations

import pytest

from zigllama_batch.server.store import ResponseStore, StoredResponse


def entry(n: int) -> StoredResponse:
    return StoredResponse({"id": f"resp_{n}"}, ({"role": "user", "content": str(n)},))


def test_the_least_recently_used_response_goes_first() -> None:
    """Beyond the bound the least recently used entry is dropped; a get refreshes one."""
    store = ResponseStore(2)
    store.put("a", entry(1))
    store.put("b", entry(2))
    assert store.get("a") == entry(1)  # now b is the least recently used
    store.put("c", entry(3))
    assert store.get("b") is None
    assert store.get("a") is not None
    assert store.get("c") is not None
    assert len(store) == 2


def test_a_store_of_size_zero_keeps_nothing_and_a_negative_size_is_refused() -> None:
    """Size 0 turns storing off; a negative size is a ValueError."""
    store = ResponseStore(0)
    store.put("a", entry(1))
    assert store.get("a") is None
    with pytest.raises(ValueError, match="max_responses"):
        ResponseStore(-1)


def test_delete_says_whether_the_response_was_stored() -> None:
    """delete() forgets a response and says whether it had one."""
    store = ResponseStore(2)
    store.put("a", entry(1))
    assert store.delete("a")
    assert not store.delete("a")
    assert repr(store) == "ResponseStore(0/2)"
