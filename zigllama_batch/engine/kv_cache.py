"""The preallocated key/value cache: storage only.

A slot holds one sequence's keys and values for every layer, up to ``max_context`` positions.
Memory is reserved once and written in place by :meth:`LLaMAModel.step`; no step copies the
cache. The reservation is virtual: pages are mapped as positions are written, so a cache sized
for long contexts costs only what its sequences use. :class:`KVBlocks` is the prefix pool's
storage, reserved the same way and kept mapped once written (on a virtual machine, the first
write to a page costs several times a later one). Which slot a sequence takes is bookkeeping
kept apart, in :class:`~zigllama_batch.engine.slots.SlotTable`.

Layout: one array per layer and per K/V, shaped ``(slots, kv_heads, max_context, head_dim)``.
Keeping layers apart (rather than one ``slots x layers x ...`` block) lets a step take a layer's
slice for a run of neighbouring slots as a view.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from .step import PoolSave

__all__ = ["KVBlocks", "KVCache"]


class KVCache:
    """Keys and values of up to ``n_slots`` sequences of up to ``max_context`` tokens.

    A step writes only the slots its items name, so steps over disjoint slots may run while
    the owner of the :class:`~zigllama_batch.engine.slots.SlotTable` hands out others.
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
        self.k: list[NDArray[np.float32]] = [_lazy_zeros(shape) for _ in range(n_layers)]
        self.v: list[NDArray[np.float32]] = [_lazy_zeros(shape) for _ in range(n_layers)]

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
    :class:`~zigllama_batch.engine.prefix_pool.PrefixPool`'s bookkeeping)."""

    def __init__(self, cache: KVCache, n_blocks: int, block_tokens: int) -> None:
        """Args:
        cache: the KV cache whose rows the blocks take and give back (it sets the shapes).
        n_blocks: blocks to reserve.
        block_tokens: positions per block.
        """
        _, self.n_kv_heads, _, self.head_dim = cache.k[0].shape
        self.block_tokens = block_tokens
        shape = (max(1, n_blocks), self.n_kv_heads, block_tokens, self.head_dim)
        self.k = [_lazy_zeros(shape) for _ in cache.k]
        self.v = [_lazy_zeros(shape) for _ in cache.v]

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


def _lazy_zeros(shape: tuple[int, ...]) -> NDArray[np.float32]:
    """Zeroed float32 memory that the OS maps 4 KiB page by page as it is written.

    An anonymous mmap rather than ``np.zeros``: numpy asks Linux for transparent huge pages on
    large allocations, and then the first write anywhere in a 2 MiB stretch commits all of it,
    so touching one position of every slot would commit most of the cache.
    """
    buffer = mmap.mmap(-1, max(1, math.prod(shape) * 4))  # anonymous: zero-filled
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, np.float32).reshape(shape)
