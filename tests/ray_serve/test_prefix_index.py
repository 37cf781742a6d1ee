"""PrefixIndex: block naming, prefix matching, LRU bounds and ranking, without Ray."""

from __future__ import annotations

import pytest

from zigllama_batch.ray_serve.prefix_index import PrefixIndex

SYSTEM = list(range(100, 164))  # 64 tokens: four whole blocks of 16


def test_prompts_share_block_names_exactly_up_to_their_first_difference() -> None:
    """Two prompts share the names of the blocks before the one where they first differ."""
    index: PrefixIndex[str] = PrefixIndex(block_size=16)
    a = index.block_hashes([*SYSTEM, 1, 2, 3])
    b = index.block_hashes([*SYSTEM[:40], 7, *SYSTEM[41:], 9])
    assert len(a) == 4  # the partial tail block is not named
    assert a[:2] == b[:2]
    assert a[2] != b[2]  # chained: a difference changes every later name
    assert a[3] != b[3]


def test_a_cache_salt_keeps_equal_prompts_apart() -> None:
    """The same tokens under different salts share no block, as in the engine's cache."""
    index: PrefixIndex[str] = PrefixIndex()
    assert index.block_hashes(SYSTEM, "tenant-a") != index.block_hashes(SYSTEM, "tenant-b")
    assert index.block_hashes(SYSTEM) == index.block_hashes(SYSTEM, None)


def test_match_counts_the_leading_blocks_a_replica_holds() -> None:
    """A replica matches as many tokens as the prompt's leading blocks it was sent."""
    index: PrefixIndex[str] = PrefixIndex(block_size=16)
    index.insert("r1", index.block_hashes(SYSTEM))
    index.insert("r2", index.block_hashes(SYSTEM[:16]))
    names = index.block_hashes([*SYSTEM, *range(16)])
    assert index.match(names, ["r1", "r2", "r3"]) == {"r1": 64, "r2": 16, "r3": 0}
    other = index.block_hashes([*SYSTEM[:20], 0, *SYSTEM[21:]])
    assert index.match(other, ["r1"]) == {"r1": 16}


def test_eviction_drops_a_prompt_from_its_tail_so_its_prefix_still_matches() -> None:
    """Over its bound a replica forgets least recently sent blocks, a prompt's last first."""
    index: PrefixIndex[str] = PrefixIndex(block_size=16, max_blocks_per_replica=4)
    index.insert("r", index.block_hashes(SYSTEM))
    index.insert("r", index.block_hashes(list(range(500, 532))))  # two newer blocks
    assert index.blocks("r") == 4
    assert index.match(index.block_hashes(SYSTEM), ["r"]) == {"r": 32}


def test_rank_prefers_the_warm_replica_unless_it_is_much_busier() -> None:
    """The longest match ranks first while its load is within the threshold of the least."""
    index: PrefixIndex[str] = PrefixIndex(block_size=16)
    index.insert("warm", index.block_hashes(SYSTEM))
    names = index.block_hashes([*SYSTEM, *range(20)])
    kw = {"min_match_tokens": 16, "imbalance_threshold": 4}
    assert index.rank(names, {"cold": 0, "warm": 3}, **kw) == [["warm"], ["cold"]]
    assert index.rank(names, {"cold": 0, "warm": 5}, **kw) is None  # too busy: no preference
    assert index.rank(names, {"warm": 0}, **kw) is None  # one replica: nothing to choose
    short = index.block_hashes(SYSTEM[:16])
    assert (
        index.rank(short, {"cold": 0, "warm": 0}, min_match_tokens=32, imbalance_threshold=4)
        is None
    )


def test_retain_and_remove_forget_replicas() -> None:
    """A replica that left the deployment has no blocks left to match."""
    index: PrefixIndex[str] = PrefixIndex()
    for r in ("a", "b", "c"):
        index.insert(r, index.block_hashes(SYSTEM))
    index.retain(["a", "b"])
    index.remove("a")
    assert [index.blocks(r) for r in ("a", "b", "c")] == [0, 4, 0]


@pytest.mark.parametrize(("block_size", "bound"), [(0, 1), (16, 0)])
def test_bad_settings_are_refused(block_size: int, bound: int) -> None:
    """A block size or bound below 1 is a ValueError."""
    with pytest.raises(ValueError, match="at least 1"):
        PrefixIndex(block_size=block_size, max_blocks_per_replica=bound)
