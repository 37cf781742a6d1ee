"""Which token ids each KV-cache slot holds, so a new sequence can start after the longest
prefix of its prompt that is already computed: bookkeeping only, like the slot table.

Inside: :class:`PrefixCache` and :class:`PrefixMatch`. For every slot it keeps the token ids
whose keys and values are in the slot (positions ``0..n-1``: a running sequence's prompt and
output so far, or what a finished one left behind until the slot is reused), the cache salt of
the requests that wrote them, and when the slot was last used. :meth:`PrefixCache.match` finds
the slot sharing the longest run of leading tokens with a prompt, at token granularity (not in
blocks), over running and free slots alike; :meth:`PrefixCache.pick_free` chooses the free slot
whose contents are worth least (empty first, then least recently used), so recent prefixes
stay warm. The owner (the scheduler) copies or reuses the rows and tells this object what it
wrote. Matching compares one prompt against every slot at once with numpy: tens of
microseconds for 32 slots of 2,048 positions.

It also knows what each slot *will* hold once its prompt is computed, so that requests
arriving together with one long shared prefix wait for the first to compute it and copy it,
instead of all computing it at once.

And it owns the index of a bounded host-memory pool
(:class:`~zigllama_batch.kv.prefix_pool.PrefixPool`, a radix tree of blocks): when a slot
is about to be overwritten, what it held is saved to the pool (:meth:`PrefixCache.plan_save`),
only the blocks the pool lacks, and later prompts match the pool as they match slots. A prefix
another slot already holds whole is not saved.

Left out here: preferring cached requests at admission (the placement's job).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .prefix_pool import BLOCK_TOKENS, PrefixPool
from .storage import PoolSave

__all__ = ["PrefixCache", "PrefixMatch"]


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """The longest cached prefix of a prompt: ``length`` leading tokens held by ``slot`` (-1
    when none), or by the pool's ``blocks`` (in order; empty when in a slot or nowhere)."""

    slot: int
    length: int
    blocks: tuple[int, ...] = ()


NO_MATCH = PrefixMatch(-1, 0)

MIN_SAVE_TOKENS = 16
"""Fewer new positions than this are not worth saving to the pool (cheaper to recompute)."""


class PrefixCache:
    """What each of ``n_slots`` slots of ``max_context`` positions holds (event loop only)."""

    def __init__(
        self, n_slots: int, max_context: int, *, pool_bytes: int = 0, bytes_per_token: int = 0
    ) -> None:
        """Args:
        n_slots: cache slots.
        max_context: positions per slot.
        pool_bytes: bound of the host-memory pool (0: no pool).
        bytes_per_token: keys and values of one position, all layers.
        """
        self.n_slots = n_slots
        self.max_context = max_context
        self.pool_limit = pool_bytes
        self.block_bytes = BLOCK_TOKENS * bytes_per_token
        self.pool = PrefixPool(pool_bytes // self.block_bytes if self.block_bytes else 0)
        self._ids = np.full((n_slots, max_context), -1, np.int64)  # token ids held, by position
        self._held = np.zeros(n_slots, np.int64)  # positions 0..held-1 are valid
        # Positions 0..planned-1 will hold the ids written so far (a prompt being prefilled).
        self._planned = np.zeros(n_slots, np.int64)
        self._salt: list[str | None] = [None] * n_slots
        self._used_at = [0] * n_slots  # logical time of the last write or reuse
        self._clock = 0
        self._pins: Counter[int] = Counter()  # slots a pending copy reads from

    def held(self, slot: int) -> int:
        """How many leading positions of ``slot`` hold known tokens."""
        return int(self._held[slot])

    def match(
        self,
        prompt_ids: Sequence[int],
        salt: str | None,
        *,
        free: Iterable[int] = (),
        planned: bool = False,
    ) -> PrefixMatch:
        """The slot holding the longest prefix of ``prompt_ids`` written under ``salt``; among
        equally long ones, a slot of ``free`` that no pending copy reads from (so the prefix
        can be reused in place, without a copy). With ``planned``, what a slot will hold once
        its sequence's prompt is computed counts too (a prefix in flight)."""
        n = min(len(prompt_ids), self.max_context)
        bound = self._planned if planned else self._held
        if n == 0:
            return NO_MATCH
        prompt = np.asarray(prompt_ids[:n], np.int64)
        in_pool = NO_MATCH if planned else self._match_pool(prompt, salt)
        if not bound.any():
            return in_pool
        same = self._ids[:, :n] == prompt  # (slots, n)
        # Leading run of matches per slot: the first mismatch, or n when all match.
        lengths = np.where(same.all(axis=1), n, same.argmin(axis=1))
        lengths = np.minimum(lengths, bound)
        for slot in range(self.n_slots):
            if self._salt[slot] != salt:
                lengths[slot] = 0
        length = int(lengths.max())
        if in_pool.length > length:  # on a tie a slot wins: it may be reused in place
            return in_pool
        if not length:
            return NO_MATCH
        best = [int(s) for s in np.flatnonzero(lengths == length)]
        takeable = set(free).intersection(best) - set(self._pins)
        return PrefixMatch(min(takeable) if takeable else best[0], length)

    def _match_pool(self, prompt: np.ndarray, salt: str | None) -> PrefixMatch:
        length, blocks = self.pool.match(prompt, salt)
        return PrefixMatch(-1, length, blocks) if length else NO_MATCH

    def pick_free(self, free: Iterable[int]) -> int:
        """Among ``free`` slots not pinned by a pending copy, the one whose contents matter
        least: an empty one, else the least recently used.

        Raises:
            RuntimeError: every free slot is pinned (callers check :meth:`n_unpinned` first).
        """
        candidates = [s for s in free if not self._pins[s]]
        if not candidates:
            raise RuntimeError("no free KV-cache slot without a pending copy")
        return min(candidates, key=lambda s: (self._held[s] > 0, self._used_at[s], s))

    def n_unpinned(self, free: Iterable[int]) -> int:
        """How many of ``free`` slots a new sequence may take."""
        return sum(1 for s in free if not self._pins[s])

    @property
    def pins(self) -> int:
        """Pending copies (each pins its source slot, or the pool blocks it reads)."""
        return sum(self._pins.values()) + self.pool.pins

    def is_pinned(self, slot: int) -> bool:
        """Whether a pending copy still reads from ``slot``."""
        return self._pins[slot] > 0

    @property
    def pool_bytes(self) -> int:
        """Bytes of the pool's blocks in use (saved, or about to be)."""
        return self.pool.used_blocks * self.block_bytes

    @property
    def evictions(self) -> int:
        """Pool blocks dropped to make room for others."""
        return self.pool.evictions

    def plan_save(self, slot: int, keep: int) -> PoolSave | None:
        """``slot`` is about to be overwritten after its first ``keep`` positions: if what it
        holds is worth keeping and held by no other slot, reserve pool blocks for the part the
        pool lacks (making room if need be). Returns what the first step of the slot's new
        sequence must save (then :meth:`saved`), or None."""
        n = int(self._held[slot])
        if n - keep < MIN_SAVE_TOKENS or not self.pool.n_blocks:
            return None
        ids = self._ids[slot, :n]
        salt = self._salt[slot]
        if self._in_another_slot(ids, salt, slot):
            return None
        return self.pool.plan_save(ids, salt, min_new=MIN_SAVE_TOKENS)

    def saved(self, save: PoolSave) -> None:
        """The step that saves ``save`` ran: later prompts may copy from it."""
        self.pool.written(save.blocks)

    def forget(self, save: PoolSave) -> None:
        """``save`` will not be made after all (its step failed or never ran)."""
        self.pool.forget(save.blocks)

    def pin_pool(self, blocks: Sequence[int]) -> None:
        """A copy from pool ``blocks`` is pending: they must not be dropped until unpinned."""
        self.pool.pin(blocks)

    def unpin_pool(self, blocks: Sequence[int]) -> None:
        """The copy from pool ``blocks`` ran (or will never run)."""
        self.pool.unpin(blocks)

    def truncate(self, slot: int, n: int) -> None:
        """``slot`` holds only its first ``n`` positions now (the rest was given back, or
        rolled back)."""
        n = min(n, int(self._held[slot]))
        self._held[slot] = n
        self._planned[slot] = min(int(self._planned[slot]), n)
        self._ids[slot, n:] = -1

    def by_age(self, slots: Iterable[int]) -> list[int]:
        """``slots`` ordered from the least recently used."""
        return sorted(slots, key=lambda s: (self._used_at[s], s))

    def release(self, slot: int) -> None:
        """``slot``'s sequence left it: what it planned but never computed is not coming."""
        held = int(self._held[slot])
        self._planned[slot] = held
        self._ids[slot, held:] = -1

    def _in_another_slot(self, ids: np.ndarray, salt: str | None, slot: int) -> bool:
        """Whether a slot other than ``slot`` holds all of ``ids`` under ``salt``."""
        n = len(ids)
        return any(
            other != slot
            and self._salt[other] == salt
            and self._held[other] >= n
            and (self._ids[other, :n] == ids).all()
            for other in range(self.n_slots)
        )

    def assign(self, slot: int, salt: str | None, keep: int, planned: Sequence[int] = ()) -> None:
        """A sequence of ``salt`` takes ``slot``, keeping its first ``keep`` positions (a prefix
        it reuses in place); everything after them will be overwritten, first with
        ``planned`` (its prompt), which :meth:`match` can wait for."""
        self._held[slot] = keep
        self._ids[slot, keep:] = -1
        self._ids[slot, keep : len(planned)] = planned[keep:]
        self._planned[slot] = max(keep, len(planned))
        self._salt[slot] = salt
        self._touch(slot)

    def record(self, slot: int, start: int, token_ids: Sequence[int]) -> None:
        """Positions ``start..start+len-1`` of ``slot`` now hold ``token_ids``."""
        end = start + len(token_ids)
        self._ids[slot, start:end] = token_ids
        self._held[slot] = max(int(self._held[slot]), end)
        self._planned[slot] = max(int(self._planned[slot]), end)
        self._touch(slot)

    def pin(self, slot: int) -> None:
        """A copy from ``slot`` is pending: its prefix must not be overwritten until unpinned."""
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        """The copy from ``slot`` ran (or will never run)."""
        assert self._pins[slot] > 0, f"slot {slot} is not pinned"
        self._pins[slot] -= 1
        if not self._pins[slot]:
            del self._pins[slot]

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._used_at[slot] = self._clock

    def __repr__(self) -> str:
        held = int((self._held > 0).sum())
        return f"PrefixCache(slots={self.n_slots}, holding={held}, pinned={len(self._pins)})"
