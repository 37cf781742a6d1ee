"""PrefixIndex: which replica was last sent which prompt prefixes, for prefix-aware routing.

A prompt's token ids are cut into blocks of ``block_size`` tokens; block ``i`` is named by a
hash chained over blocks ``0..i`` (and the request's cache salt), as vLLM names its KV blocks, so
two prompts share a block name exactly when they share every token up to the block's end. Each
replica keeps the names of the blocks routed to it in LRU order, bounded by
``max_blocks_per_replica`` (about what its prefix cache holds). A match is the number of leading
blocks a replica holds, in tokens.

Simplified: the index records what was *sent*, not what a replica's cache still holds, the way
SGLang's router and Ray Serve LLM's prefix router approximate it; a replica that evicted a
prefix costs one recomputation, never a wrong answer. Blocks are whole: a prompt's last partial
block is not indexed (the engine reuses whole positions, but a 15-token tail is not worth routing
for). Pure and synchronous, no Ray here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

__all__ = ["PrefixIndex"]


class PrefixIndex:
    """Per-replica LRU sets of chained block hashes of the prompts routed to each replica."""

    def __init__(self, *, block_size: int = 16, max_blocks_per_replica: int = 8192) -> None:
        """Args:
        block_size: tokens per block; matches are counted in whole blocks.
        max_blocks_per_replica: blocks remembered per replica (8,192 x 16 = 131,072 tokens,
            the order of what one replica's slots and prefix pool hold).
        """
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        if max_blocks_per_replica < 1:
            raise ValueError(
                f"max_blocks_per_replica must be at least 1, got {max_blocks_per_replica}"
            )
        self.block_size = block_size
        self.max_blocks_per_replica = max_blocks_per_replica
        self._blocks: dict[Hashable, OrderedDict[int, None]] = {}

    def block_hashes(self, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
        """The chained names of the prompt's whole blocks, first block first."""
        names: list[int] = []
        name = hash(("zigllama", salt))
        size = self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            name = hash((name, *token_ids[start : start + size]))
            names.append(name)
        return names

    def match(self, names: Sequence[int], replicas: Iterable[Hashable]) -> dict[Hashable, int]:
        """Tokens of the prompt (given by its block names) each replica holds as a prefix."""
        matched: dict[Hashable, int] = {}
        for replica in replicas:
            held = self._blocks.get(replica)
            n = 0
            if held is not None:
                while n < len(names) and names[n] in held:
                    n += 1
            matched[replica] = n * self.block_size
        return matched

    def insert(self, replica: Hashable, names: Sequence[int]) -> None:
        """Record that the prompt's blocks were sent to ``replica`` (most recent use)."""
        held = self._blocks.setdefault(replica, OrderedDict())
        # Last block first: a prefix is then always more recent than its extensions, so LRU
        # eviction removes a chain from its tail and never leaves an unreachable middle.
        for name in reversed(names):
            held[name] = None
            held.move_to_end(name)
        while len(held) > self.max_blocks_per_replica:
            held.popitem(last=False)

    def remove(self, replica: Hashable) -> None:
        """Forget a replica (it died or was scaled down)."""
        self._blocks.pop(replica, None)

    def retain(self, replicas: Iterable[Hashable]) -> None:
        """Forget every replica not in ``replicas``."""
        keep = set(replicas)
        for replica in [r for r in self._blocks if r not in keep]:
            del self._blocks[replica]

    def blocks(self, replica: Hashable) -> int:
        """Blocks remembered for ``replica``."""
        return len(self._blocks.get(replica, ()))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{r}: {len(b)}" for r, b in self._blocks.items())
        return f"<PrefixIndex block_size={self.block_size} blocks={{{sizes}}}>"
