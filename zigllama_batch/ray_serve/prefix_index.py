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
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

__all__ = ["PrefixIndex"]

K = TypeVar("K", bound=Hashable)
"""A replica's key (Serve's ReplicaID; anything hashable in tests)."""


class PrefixIndex(Generic[K]):
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
        self._blocks: dict[K, OrderedDict[int, None]] = {}

    def block_hashes(self, token_ids: Sequence[int], salt: str | None = None) -> list[int]:
        """The chained names of the prompt's whole blocks, first block first."""
        names: list[int] = []
        name = hash(("zigllama", salt))
        size = self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            name = hash((name, *token_ids[start : start + size]))
            names.append(name)
        return names

    def match(self, names: Sequence[int], replicas: Iterable[K]) -> dict[K, int]:
        """Tokens of the prompt (given by its block names) each replica holds as a prefix."""
        matched: dict[K, int] = {}
        for replica in replicas:
            held = self._blocks.get(replica)
            n = 0
            if held is not None:
                while n < len(names) and names[n] in held:
                    n += 1
            matched[replica] = n * self.block_size
        return matched

    def rank(
        self,
        names: Sequence[int],
        loads: Mapping[K, int],
        *,
        min_match_tokens: int,
        imbalance_threshold: int,
    ) -> list[list[K]] | None:
        """Replicas to try for a prompt, best rank first, or None for "no preference".

        The replicas (keys of ``loads``, their ongoing requests) holding the longest prefix of
        at least ``min_match_tokens`` rank first, unless they carry more than
        ``imbalance_threshold`` requests beyond the least loaded replica; the others follow.
        """
        if not names or len(loads) < 2:
            return None
        matched = self.match(names, loads)
        best = max(matched.values())
        if best < min_match_tokens:
            return None
        least = min(loads.values())
        warm = [
            r for r, n in matched.items() if n == best and loads[r] - least <= imbalance_threshold
        ]
        if not warm:
            return None
        rest = [r for r in loads if r not in warm]
        return [warm, rest] if rest else [warm]

    def insert(self, replica: K, names: Sequence[int]) -> None:
        """Record that the prompt's blocks were sent to ``replica`` (most recent use)."""
        held = self._blocks.setdefault(replica, OrderedDict())
        # Last block first: a prefix is then always more recent than its extensions, so LRU
        # eviction removes a chain from its tail and never leaves an unreachable middle.
        for name in reversed(names):
            held[name] = None
            held.move_to_end(name)
        while len(held) > self.max_blocks_per_replica:
            held.popitem(last=False)

    def remove(self, replica: K) -> None:
        """Forget a replica (it died or was scaled down)."""
        self._blocks.pop(replica, None)

    def retain(self, replicas: Iterable[K]) -> None:
        """Forget every replica not in ``replicas``."""
        keep = set(replicas)
        for replica in [r for r in self._blocks if r not in keep]:
            del self._blocks[replica]

    def blocks(self, replica: K) -> int:
        """Blocks remembered for ``replica``."""
        return len(self._blocks.get(replica, ()))

    def __repr__(self) -> str:
        sizes = ", ".join(f"{r}: {len(b)}" for r, b in self._blocks.items())
        return f"<PrefixIndex block_size={self.block_size} blocks={{{sizes}}}>"
