"""Key/value storage: the arrays steps write, and the transfers a step makes before it runs.

A slot holds one sequence's keys and values for every layer, up to ``max_context`` positions.
Memory is reserved once and written in place by :meth:`LLaMAModel.step`; no step copies the
cache. The reservation is virtual: pages are mapped as positions are written, so a cache sized
for long contexts costs only what its sequences use, and :meth:`KVCache.release` hands a slot's
pages past a position back to the OS (``MADV_DONTNEED``). :class:`KVBlocks` is the prefix
pool's storage, reserved the same way and kept mapped once written (on a virtual machine, the
first write to a page costs several times a later one). :class:`Transfer` is what one step
moves before its forward pass (a prefix copied in from another slot or the pool; what the slot
held, saved to the pool); which slot holds what is :class:`~zigllama_batch.kv.KVManager`'s
bookkeeping.

Layout: one array per layer and per K/V, shaped ``(slots, kv_heads, max_context, head_dim)``.
Keeping layers apart (rather than one ``slots x layers x ...`` block) gives each layer's
attention one contiguous array to read its slots from.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["KVBlocks", "KVCache", "PoolSave", "Transfer"]


@dataclass(frozen=True, slots=True)
class PoolSave:
    """Positions ``[start, end)`` of a slot to save in the host-memory pool of evicted
    prefixes, block by block: ``blocks[i]`` takes the ``i``-th run of the pool's block size
    from ``start`` (the last one possibly partial)."""

    start: int
    end: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Transfer:
    """What a sequence's first step moves into (and out of) its slot before the forward pass:
    first ``save`` (what an earlier sequence left in the slot goes to the pool), then positions
    ``[0, start_pos)`` from slot ``from_slot`` or from pool blocks ``from_pool`` (a prefix
    computed before)."""

    save: PoolSave | None = None
    from_slot: int | None = None
    from_pool: tuple[int, ...] | None = None


class KVCache:
    """Keys and values of up to ``n_slots`` sequences of up to ``max_context`` tokens.

    A step writes only the slots its items name, so steps over disjoint slots may run while
    the KV manager hands out others.
    """

    def __init__(
        self, *, n_layers: int, n_kv_heads: int, head_dim: int, n_slots: int, max_context: int
    ) -> None:
        """Args:
        n_layers: layers that keep keys and values.
        n_kv_heads: key/value heads per layer.
        head_dim: width of one head.
        n_slots: sequences held at once.
        max_context: positions per slot (the model checks this against its own context).
        """
        if n_slots < 1:
            raise ValueError(f"n_slots: must be >= 1, got {n_slots}")
        if max_context < 2:
            raise ValueError(f"max_context: must be >= 2, got {max_context}")
        self.n_slots = n_slots
        self.max_context = max_context
        shape = (n_slots, n_kv_heads, max_context, head_dim)
        self._buffers: list[mmap.mmap] = []
        self.k: list[NDArray[np.float32]] = [self._lazy(shape) for _ in range(n_layers)]
        self.v: list[NDArray[np.float32]] = [self._lazy(shape) for _ in range(n_layers)]

    def _lazy(self, shape: tuple[int, ...]) -> NDArray[np.float32]:
        array, buffer = _lazy_zeros(shape)
        self._buffers.append(buffer)
        return array

    def release(self, slot: int, keep: int) -> None:
        """Give the memory of ``slot``'s positions from ``keep`` on back to the OS (they read
        as zeros until written again). Whole pages only: a page that also holds a kept
        position stays."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, heads, context, width = self.k[0].shape
        row = width * 4  # bytes of one position of one head
        for buffer in self._buffers:
            for h in range(heads):
                head = (slot * heads + h) * context * row  # where this head's positions start
                first = -(-(head + keep * row) // mmap.PAGESIZE) * mmap.PAGESIZE
                end = (head + context * row) // mmap.PAGESIZE * mmap.PAGESIZE
                if end > first:
                    buffer.madvise(mmap.MADV_DONTNEED, first, end - first)

    def prepare(self, moves: Sequence[tuple[int, int, Transfer]], pool: KVBlocks | None) -> None:
        """Make the transfers of one step's items, ``(slot, positions copied in, transfer)``
        each: first every save to the pool, then every copy in, so no item reads a slot that
        another is about to overwrite.

        Raises:
            ValueError: a transfer reads or writes a pool that was not reserved.
        """
        if pool is None and any(t.save or t.from_pool for _, _, t in moves):
            raise ValueError("a step saves to or restores from a pool that was not reserved")
        for slot, _, t in moves:
            if t.save is not None:
                assert pool is not None
                pool.save(self, slot, t.save)
        for slot, n, t in moves:
            if t.from_slot is not None:
                self.copy_prefix(t.from_slot, slot, n)
            elif t.from_pool is not None:
                assert pool is not None
                pool.restore(self, slot, t.from_pool, n)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the keys and values of positions ``[0, n)`` from slot ``src`` into slot ``dst``
        (prefix reuse: ``dst`` then continues after them)."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]  # (kv_heads, n, head_dim)
            v[dst, :, :n] = v[src, :, :n]

    @property
    def nbytes(self) -> int:
        """Bytes reserved for keys and values (virtual: pages are mapped as they are written)."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def __repr__(self) -> str:
        return (
            f"KVCache(slots={self.n_slots}, max_context={self.max_context}, "
            f"reserved={self.nbytes / 2**20:.0f} MiB)"
        )


class KVBlocks:
    """Keys and values of evicted prefixes in host memory, in ``n_blocks`` blocks of
    ``block_tokens`` positions (which block holds what is
    :class:`~zigllama_batch.kv.prefix_pool.PrefixPool`'s bookkeeping)."""

    def __init__(self, cache: KVCache, n_blocks: int, block_tokens: int) -> None:
        """Args:
        cache: the KV cache whose rows the blocks take and give back (it sets the shapes).
        n_blocks: blocks to reserve.
        block_tokens: positions per block.
        """
        _, self.n_kv_heads, _, self.head_dim = cache.k[0].shape
        self.block_tokens = block_tokens
        shape = (max(1, n_blocks), self.n_kv_heads, block_tokens, self.head_dim)
        self.k = [_lazy_zeros(shape)[0] for _ in cache.k]
        self.v = [_lazy_zeros(shape)[0] for _ in cache.v]

    def save(self, cache: KVCache, slot: int, save: PoolSave) -> None:
        """Copy positions ``[save.start, save.end)`` of ``slot`` into ``save.blocks``."""
        b, h, d = self.block_tokens, self.n_kv_heads, self.head_dim
        blocks = np.asarray(save.blocks, np.int64)
        full, rest = divmod(save.end - save.start, b)
        for src, dst in zip(cache.k + cache.v, self.k + self.v, strict=True):
            rows = src[slot, :, save.start : save.end]  # (KVH, n, hd)
            if full:  # (KVH, full * b, hd) -> (full, KVH, b, hd)
                dst[blocks[:full]] = (
                    rows[:, : full * b].reshape(h, full, b, d).transpose(1, 0, 2, 3)
                )
            if rest:
                dst[blocks[full], :, :rest] = rows[:, full * b :]

    def restore(self, cache: KVCache, slot: int, blocks: Sequence[int], n: int) -> None:
        """Copy the first ``n`` positions held by ``blocks`` (in order) into ``slot``."""
        b, h, d = self.block_tokens, self.n_kv_heads, self.head_dim
        full, rest = divmod(n, b)
        index = np.asarray(blocks[:full], np.int64)
        for dst, src in zip(cache.k + cache.v, self.k + self.v, strict=True):
            if full:  # (full, KVH, b, hd) -> (KVH, full * b, hd)
                dst[slot, :, : full * b] = src[index].transpose(1, 0, 2, 3).reshape(h, full * b, d)
            if rest:
                dst[slot, :, full * b : n] = src[blocks[full], :, :rest]

    @property
    def nbytes(self) -> int:
        """Bytes reserved (virtual until written)."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


def _lazy_zeros(shape: tuple[int, ...]) -> tuple[NDArray[np.float32], mmap.mmap]:
    """Zeroed float32 memory that the OS maps 4 KiB page by page as it is written.

    An anonymous mmap rather than ``np.zeros``: numpy asks Linux for transparent huge pages on
    large allocations, and then the first write anywhere in a 2 MiB stretch commits all of it,
    so touching one position of every slot would commit most of the cache.
    """
    # Private and anonymous: zero-filled, and MADV_DONTNEED frees its pages (a shared mapping
    # would keep them in shared memory).
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    buffer = mmap.mmap(-1, max(1, math.prod(shape) * 4), flags=flags)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, np.float32).reshape(shape), buffer
