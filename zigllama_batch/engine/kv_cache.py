"""The preallocated key/value cache and its slot allocator.

A slot holds one sequence's keys and values for every layer, up to ``max_context`` positions.
Memory is reserved once and written in place by :meth:`LLaMAModel.step`; no step copies the
cache. The reservation is virtual: pages are mapped as positions are written, so a cache sized
for long contexts costs only what its sequences use.

Layout: one array per layer and per K/V, shaped ``(slots, kv_heads, max_context, head_dim)``.
Keeping layers apart (rather than one ``slots x layers x ...`` block) lets a step take a layer's
slice for a run of neighbouring slots as a view.
"""

from __future__ import annotations

import heapq
import math
import mmap

import numpy as np
from numpy.typing import NDArray

from .gguf_loader import LlamaConfig

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of up to ``n_slots`` sequences of up to ``max_context`` tokens.

    Slot allocation is plain bookkeeping (no locks): the owner calls :meth:`allocate` and
    :meth:`free` from one thread, and a step only touches the slots it was given.
    """

    def __init__(self, config: LlamaConfig, n_slots: int, max_context: int) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots: must be >= 1, got {n_slots}")
        if not 2 <= max_context <= config.context_length:
            raise ValueError(
                f"max_context: must be in [2, {config.context_length}] (the model's context "
                f"length), got {max_context}"
            )
        self.n_slots = n_slots
        self.max_context = max_context
        shape = (n_slots, config.n_kv_heads, max_context, config.head_dim)
        self.k: list[NDArray[np.float32]] = [_lazy_zeros(shape) for _ in range(config.n_layers)]
        self.v: list[NDArray[np.float32]] = [_lazy_zeros(shape) for _ in range(config.n_layers)]
        self._free: list[int] = list(range(n_slots))  # a heap: lowest free slot first
        self._used: set[int] = set()

    @property
    def n_free(self) -> int:
        """Slots not held by any sequence."""
        return len(self._free)

    @property
    def n_used(self) -> int:
        """Slots held by sequences."""
        return len(self._used)

    @property
    def nbytes(self) -> int:
        """Bytes reserved for keys and values (virtual: pages are mapped as they are written)."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def allocate(self) -> int:
        """Take the lowest free slot (so running sequences sit in neighbouring slots).

        Raises:
            RuntimeError: no slot is free; callers check :attr:`n_free` first.
        """
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back. Its stale contents are overwritten by the next sequence's prefill."""
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    def __repr__(self) -> str:
        return (
            f"KVCache(slots={self.n_slots}, used={self.n_used}, max_context={self.max_context}, "
            f"reserved={self.nbytes / 2**20:.0f} MiB)"
        )


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
