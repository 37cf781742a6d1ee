"""Prefix-cache bookkeeping: the longest held prefix of a prompt at token granularity, salts
kept apart, in-place reuse preferred, recent contents kept warm, pinned sources untouched; and
the KV rows it points at give the same logits as recomputing them."""

from __future__ import annotations

import numpy as np
import pytest

from zigllama_batch import LLaMAModel, Tokenizer
from zigllama_batch.engine import SequenceStep
from zigllama_batch.engine.prefix_cache import PrefixCache, PrefixMatch


def cache_holding(*contents: list[int], salts: list[str | None] | None = None) -> PrefixCache:
    cache = PrefixCache(len(contents) + 1, 64)
    for slot, ids in enumerate(contents):
        cache.assign(slot, (salts or [None] * len(contents))[slot], keep=0)
        cache.record(slot, 0, ids)
    return cache


def test_match_is_the_longest_prefix_at_token_granularity() -> None:
    """The slot sharing the most leading tokens wins, whatever the length (no blocks)."""
    cache = cache_holding([1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9, 9], [7, 1, 2])
    assert cache.match([1, 2, 3, 4, 6], None) == PrefixMatch(0, 4)
    assert cache.match([1, 2, 3, 9, 9], None) == PrefixMatch(1, 5)
    assert cache.match([1, 2], None).length == 2
    assert cache.match([8, 1, 2], None) == PrefixMatch(-1, 0)
    assert cache.match([], None) == PrefixMatch(-1, 0)


def test_match_never_goes_past_what_a_slot_holds() -> None:
    """A slot holding 3 tokens matches at most 3, even if the prompt continues."""
    cache = cache_holding([5, 6, 7])
    assert cache.match([5, 6, 7, 8, 9], None) == PrefixMatch(0, 3)
    cache.assign(0, None, keep=2)  # a new sequence keeps two and will overwrite the rest
    assert cache.match([5, 6, 7, 8], None) == PrefixMatch(0, 2)


def test_salts_never_share() -> None:
    """A prefix written under one salt is invisible to every other salt, and to no salt."""
    cache = cache_holding([1, 2, 3], [1, 2], salts=["a", None])
    assert cache.match([1, 2, 3], "a") == PrefixMatch(0, 3)
    assert cache.match([1, 2, 3], None) == PrefixMatch(1, 2)
    assert cache.match([1, 2, 3], "b") == PrefixMatch(-1, 0)


def test_ties_prefer_a_free_unpinned_slot() -> None:
    """Of equally long matches, one in a free slot that no copy reads from is chosen (reuse in
    place, no copy)."""
    cache = cache_holding([1, 2, 3], [1, 2, 3], [1, 2, 3])
    assert cache.match([1, 2, 3], None, free=[2]).slot == 2
    cache.pin(2)
    assert cache.match([1, 2, 3], None, free=[1, 2]).slot == 1
    cache.unpin(2)
    assert cache.match([1, 2, 3], None, free=[1, 2]).slot == 1


def test_pick_free_takes_empty_then_least_recently_used_and_never_pinned() -> None:
    """A new sequence goes to an empty slot first, then to the slot used least recently, so
    recent prefixes stay warm; a slot a pending copy reads from is never taken."""
    cache = cache_holding([1], [2], [3])  # slot 3 is empty
    assert cache.pick_free([0, 1, 2, 3]) == 3
    cache.record(0, 1, [9])  # slot 0 used last
    assert cache.pick_free([0, 1, 2]) == 1
    cache.pin(1)
    assert cache.pick_free([0, 1, 2]) == 2
    assert cache.n_unpinned([0, 1, 2]) == 2
    cache.pin(0)
    cache.pin(2)
    with pytest.raises(RuntimeError):
        cache.pick_free([0, 1, 2])


def _logits(model: LLaMAModel, cache: object, items: list[SequenceStep]) -> np.ndarray:
    return model.step(items, cache)  # type: ignore[arg-type]


def test_reused_and_copied_prefixes_give_the_recomputed_logits(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """A prompt's last logits agree within 1e-4 whether its prefix was computed in the same
    step, reused in place from an earlier step in the same slot, or copied from another slot
    (KVCache.copy_prefix), for prefixes of several lengths."""
    model, tokenizer = tiny
    prompt = tokenizer.encode("the cat sat on the mat and looked at the dog")
    for k in (1, 3, len(prompt) - 1):
        cache = model.new_cache(3, 64)
        whole = _logits(model, cache, [SequenceStep(0, prompt, 0)])[0]
        # In place: slot 1 computed the prefix in an earlier step.
        _logits(model, cache, [SequenceStep(1, prompt[:k], 0)])
        in_place = _logits(model, cache, [SequenceStep(1, prompt[k:], k)])[0]
        # Copied: slot 2 takes slot 0's first k positions, then computes the rest.
        cache.copy_prefix(0, 2, k)
        copied = _logits(model, cache, [SequenceStep(2, prompt[k:], k)])[0]
        np.testing.assert_allclose(in_place, whole, atol=1e-4, rtol=0)
        np.testing.assert_allclose(copied, whole, atol=1e-4, rtol=0)


def pooled(n_slots: int = 2, pool_tokens: int = 100) -> PrefixCache:
    """A cache whose pool holds ``pool_tokens`` positions (one byte each)."""
    return PrefixCache(n_slots, 64, pool_bytes=pool_tokens, bytes_per_token=1)


def fill(cache: PrefixCache, slot: int, ids: list[int], salt: str | None = None) -> None:
    cache.assign(slot, salt, keep=0)
    cache.record(slot, 0, ids)


def test_an_overwritten_slot_is_saved_and_matched_once_saved() -> None:
    """A slot about to be overwritten is reserved a pool entry; prompts find the entry only
    once the step that saves it has run; later they match it like a slot."""
    cache = pooled()
    fill(cache, 0, list(range(1, 31)))
    save, dropped = cache.plan_save(0, keep=0)
    assert save is not None
    assert dropped == []
    entry, n = save
    assert n == 30
    cache.assign(0, None, keep=0)  # the new sequence takes the slot
    cache.record(0, 0, [99] * 5)
    assert cache.match(list(range(1, 31)), None).length == 0  # not saved yet
    cache.saved(entry)
    assert cache.match(list(range(1, 41)), None) == PrefixMatch(-1, 30, entry)
    assert cache.pool_bytes == 30


def test_short_or_duplicate_prefixes_are_not_saved() -> None:
    """Fewer than 16 tokens to lose, or tokens another slot or entry holds already: no entry."""
    cache = pooled(n_slots=3)
    fill(cache, 0, list(range(1, 11)))
    assert cache.plan_save(0, keep=0) == (None, [])
    fill(cache, 1, list(range(1, 41)))
    fill(cache, 2, list(range(1, 31)))  # a prefix of slot 1's
    assert cache.plan_save(2, keep=0) == (None, [])
    assert cache.plan_save(1, keep=30) == (None, [])  # only 10 to lose


def test_the_pool_stays_under_its_bound_least_recently_used_first() -> None:
    """Entries are dropped least recently used first to make room; a pinned entry, or one not
    yet saved, is never dropped; an entry the new one extends is replaced by it."""
    cache = pooled(n_slots=1, pool_tokens=70)
    entries = []
    for base in (100, 200):
        fill(cache, 0, [base + i for i in range(30)])
        (entry, _), _ = cache.plan_save(0, keep=0)
        cache.saved(entry)
        entries.append(entry)
    cache.pin_entry(entries[0])  # pinned: must survive
    fill(cache, 0, [300 + i for i in range(30)])
    save, dropped = cache.plan_save(0, keep=0)
    assert save is not None
    assert dropped == [entries[1]]
    assert cache.evictions == 1
    assert cache.pool_bytes == 60 <= cache.pool_limit
    cache.unpin_entry(entries[0])
    cache.saved(save[0])
    # A longer prefix of the same tokens replaces the entry it extends.
    fill(cache, 0, [300 + i for i in range(40)])
    save2, dropped2 = cache.plan_save(0, keep=0)
    assert save2 is not None
    assert save[0] in dropped2
    assert cache.pool_bytes <= cache.pool_limit


def test_a_released_slot_forgets_what_it_only_planned() -> None:
    """A sequence that leaves its slot before computing its prompt leaves no planned tokens
    behind (they would hide the sequence really computing that prefix)."""
    cache = pooled()
    cache.assign(0, None, keep=0, planned=list(range(1, 40)))
    cache.record(0, 0, [1, 2, 3])
    assert cache.match(list(range(1, 40)), None, planned=True).length == 39
    cache.release(0)
    assert cache.match(list(range(1, 40)), None, planned=True).length == 3


def test_unpinning_what_is_not_pinned_is_a_bug() -> None:
    """A pin released twice would drop another request's pin: it fails loudly."""
    cache = pooled()
    cache.pin(1)
    cache.unpin(1)
    with pytest.raises(AssertionError):
        cache.unpin(1)


def test_logits_after_a_pool_round_trip_equal_the_recomputed_ones(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """A prefix saved from a slot (read_prefix) and written back into another slot
    (write_prefix) gives the same logits as computing the prompt whole."""
    model, tokenizer = tiny
    prompt = tokenizer.encode("the cat sat on the mat and looked at the dog")
    cache = model.new_cache(2, 64)
    whole = _logits(model, cache, [SequenceStep(0, prompt, 0)])[0]
    k = len(prompt) - 2
    rows = cache.read_prefix(0, k)
    cache.write_prefix(1, rows, k)
    restored = _logits(model, cache, [SequenceStep(1, prompt[k:], k)])[0]
    np.testing.assert_allclose(restored, whole, atol=1e-4, rtol=0)
