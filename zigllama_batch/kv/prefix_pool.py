"""Which evicted prefixes the host-memory pool holds: a radix tree of fixed-size blocks.

Inside: :class:`PrefixPool`, bookkeeping only (the rows live in
:class:`~zigllama_batch.kv.storage.KVBlocks`, block by block). Each node of the tree is
one block of up to :data:`BLOCK_TOKENS` consecutive token ids, under the node holding the ids
before them, so prefixes that share a head share its blocks: the head is stored once, however
many prompts continue it. Full blocks are found by their ids (a dict lookup per block); the
last node of a prefix may be a partial block, and a prompt may stop partway through any
block, so matches are at token granularity. One tree per cache salt.

Eviction takes the least recently used leaf first, and a use touches the whole path, so a
block is never dropped before the blocks that continue it: shared heads stay longest. Blocks
being written (by a step that has not run yet) or read (by a pending restore) are never
dropped, and a prompt does not match a block until it is written.

Left out: splitting a partial block's tokens between two prompts (a node's ids are fixed when
it is made); reference counting across salts (the same ids under two salts are two blocks).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .storage import PoolSave

__all__ = ["BLOCK_TOKENS", "PrefixPool"]

BLOCK_TOKENS = 16
"""Positions per pool block (vLLM's default block size): small enough that a partial last block
wastes little, large enough that a 1,000-token prefix is ~60 dict lookups."""


@dataclass(slots=True, eq=False)
class _Node:
    tokens: tuple[int, ...]  # up to BLOCK_TOKENS ids, at positions depth .. depth + len - 1
    block: int  # where its rows live; -1 for a root
    parent: _Node | None
    depth: int
    used_at: int = 0
    written: bool = True  # its rows are in the block (the step that writes them has run)
    pins: int = 0  # pending restores that read it
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    salt: str | None = None  # a root's salt


class PrefixPool:
    """The index of ``n_blocks`` pool blocks (event loop only)."""

    def __init__(self, n_blocks: int, block_tokens: int = BLOCK_TOKENS) -> None:
        self.n_blocks = n_blocks
        self.block_tokens = block_tokens
        self.evictions = 0
        """Blocks dropped to make room for others."""
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: low block ids first
        self._nodes: dict[int, _Node] = {}  # by block
        self._roots: dict[str | None, _Node] = {}  # only salts with blocks in the pool
        self._clock = 0
        self._pinned = 0  # pending restores, counted per block they read

    @property
    def used_blocks(self) -> int:
        """Blocks that hold (or are about to hold) a prefix's rows."""
        return self.n_blocks - len(self._free)

    @property
    def pins(self) -> int:
        """Pending restores, counted per block they read."""
        return self._pinned

    def match(self, prompt: np.ndarray, salt: str | None) -> tuple[int, tuple[int, ...]]:
        """The longest written prefix of ``prompt`` under ``salt``: its length in tokens, and
        the blocks holding it, in order (the last may be used in part)."""
        node = self._roots.get(salt)
        if node is None:
            return 0, ()
        b, pos, blocks = self.block_tokens, 0, []
        while pos < len(prompt):
            ahead = tuple(int(t) for t in prompt[pos : pos + b])
            child = node.children.get(ahead) if len(ahead) == b else None
            if child is not None and child.written:
                blocks.append(child.block)
                node, pos = child, pos + b
                continue
            # The prompt ends, or leaves the tree, inside this block: the written child sharing
            # the longest run of leading ids with it.
            best, run = None, 0
            for c in node.children.values():
                r = _common_run(c.tokens, ahead)
                if c.written and r > run:
                    best, run = c, r
            if best is not None:
                blocks.append(best.block)
                pos += run
            break
        return pos, tuple(blocks)

    def plan_save(self, ids: np.ndarray, salt: str | None, *, min_new: int) -> PoolSave | None:
        """Reserve blocks for the part of ``ids`` the tree lacks (at least ``min_new`` ids, or
        nothing), dropping least recently used leaves to make room. Returns what the step
        must write (then :meth:`written`, or :meth:`forget` if it never runs), or None."""
        b = self.block_tokens
        root = self._roots.get(salt) or _Node((), -1, None, 0, salt=salt)
        node, pos = root, 0
        path = []
        while pos + b <= len(ids):
            child = node.children.get(tuple(int(t) for t in ids[pos : pos + b]))
            if child is None:
                break
            if not child.written:
                return None  # another step is writing this prefix right now
            node, pos = child, pos + b
            path.append(node)
        new = len(ids) - pos
        ahead = tuple(int(t) for t in ids[pos:])
        if new < min_new or any(c.tokens[:new] == ahead for c in node.children.values()):
            return None
        needed = -(-new // b)
        if needed > self.n_blocks:
            return None
        self._touch(path)
        node.pins += 1  # the node it hangs from must survive the room-making
        try:
            if not self._make_room(needed):
                return None  # the rest is pinned or being written: nothing was dropped
        finally:
            node.pins -= 1
        self._roots[salt] = root  # (again, if making room emptied it)
        # A partial block of the same ids that the new blocks extend is replaced by them.
        for key, c in list(node.children.items()):
            if len(key) < b and c.written and not c.pins and ahead[: len(key)] == key:
                self._remove(c)
        blocks = []
        for i in range(needed):
            tokens = ahead[i * b : (i + 1) * b]
            child = _Node(tokens, self._free.pop(), node, pos + i * b, self._clock, False)
            node.children[tokens] = child
            self._nodes[child.block] = child
            blocks.append(child.block)
            node = child
        return PoolSave(start=pos, end=len(ids), blocks=tuple(blocks))

    def written(self, blocks: Iterable[int]) -> None:
        """The step that writes ``blocks`` ran: prompts may match them."""
        for block in blocks:
            if (node := self._nodes.get(block)) is not None:
                node.written = True

    def forget(self, blocks: Iterable[int]) -> None:
        """``blocks`` (reserved by :meth:`plan_save`) will not be written after all."""
        for block in reversed(tuple(blocks)):  # deepest first: each is then a leaf
            node = self._nodes.get(block)
            if node is not None and not node.written:
                self._remove(node)

    def pin(self, blocks: Iterable[int]) -> None:
        """A restore from ``blocks`` is pending: they must not be dropped until unpinned."""
        nodes = [self._nodes[block] for block in blocks]
        for node in nodes:
            node.pins += 1
        self._pinned += len(nodes)
        self._touch(nodes)

    def unpin(self, blocks: Iterable[int]) -> None:
        """The restore from ``blocks`` ran (or will never run)."""
        for block in blocks:
            node = self._nodes[block]
            assert node.pins > 0, f"pool block {block} is not pinned"
            node.pins -= 1
            self._pinned -= 1

    def check(self, *, idle: bool = False) -> None:
        """Assert the tree's invariants: every block free or in the tree, once; each node
        under its parent. With ``idle`` (no step pending): every block written, none pinned."""
        assert len(self._nodes) + len(self._free) == self.n_blocks
        assert not set(self._free) & set(self._nodes)
        for block, node in self._nodes.items():
            assert node.block == block
            assert node.parent is not None
            assert node.parent.children.get(node.tokens) is node
            if idle:
                assert node.written, node
                assert node.pins == 0, node

    def _touch(self, nodes: list[_Node]) -> None:
        self._clock += 1
        for node in nodes:
            node.used_at = self._clock

    def _make_room(self, needed: int) -> bool:
        """Drop least recently used leaves (the deepest on a tie) until ``needed`` blocks are
        free; False, with nothing dropped, when that many cannot be freed."""
        short = needed - len(self._free)
        if short <= 0:
            return True
        droppable = self._droppable()
        if len(droppable) < short:
            return False
        heap = [(n.used_at, -n.depth, n.block, n) for n in droppable if not n.children]
        heapq.heapify(heap)
        for _ in range(short):
            *_, node = heapq.heappop(heap)
            parent = node.parent
            self._remove(node)
            self.evictions += 1
            if parent is not None and parent in droppable and not parent.children:
                heapq.heappush(heap, (parent.used_at, -parent.depth, parent.block, parent))
        return True

    def _droppable(self) -> set[_Node]:
        """Blocks that may go: written, unpinned, and all the blocks below them too."""
        out: set[_Node] = set()

        def visit(node: _Node) -> bool:
            below = [visit(c) for c in list(node.children.values())]
            if node.block >= 0 and node.written and not node.pins and all(below):
                out.add(node)
                return True
            return False

        for root in self._roots.values():
            visit(root)
        return out

    def _remove(self, node: _Node) -> None:
        assert not node.children, "only a leaf is removed"
        parent = node.parent
        assert parent is not None, "a root is never removed"
        del parent.children[node.tokens]
        del self._nodes[node.block]
        self._free.append(node.block)
        if parent.block < 0 and not parent.children and self._roots.get(parent.salt) is parent:
            del self._roots[parent.salt]  # a salt with nothing left keeps no root

    def __repr__(self) -> str:
        return (
            f"PrefixPool(blocks={self.used_blocks}/{self.n_blocks}, "
            f"block_tokens={self.block_tokens}, evictions={self.evictions})"
        )


def _common_run(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
