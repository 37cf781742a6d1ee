"""Keys and values, with one owner: storage, which positions each sequence holds, prefix reuse,
the host-memory pool of evicted prefixes, the memory budget, preemption and rollback.

The modules, from what the scheduler sees down to the bytes: ``manager`` (:class:`KVManager`:
allocate, fit a step, free, preempt, roll back, stats), ``placement`` (which slot a sequence
takes, and the prefix it reuses), ``prefix_cache`` (which token ids each slot holds),
``prefix_pool`` (the pool's radix tree of blocks), ``slots`` (free and used slots) and
``storage`` (the arrays steps write, pages given back, and the transfers a step makes first).
Nothing here knows about asyncio or the model's arithmetic.
"""

from .manager import KVEngine, KVManager, KVStats, default_budget_bytes
from .storage import KVBlocks, KVCache, PoolSave, Transfer

__all__ = [
    "KVBlocks",
    "KVCache",
    "KVEngine",
    "KVManager",
    "KVStats",
    "PoolSave",
    "Transfer",
    "default_budget_bytes",
]
