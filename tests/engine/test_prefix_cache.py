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
