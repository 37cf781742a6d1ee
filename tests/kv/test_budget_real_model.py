"""The KV manager over the real engine: preemption recomputes exactly, released slots give their
memory back to the OS, and rollback forgets positions."""

from __future__ import annotations

import asyncio
import mmap

import numpy as np
import pytest
from async_helpers import eventually

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    LLaMAModel,
    Tokenizer,
)
from zigllama_batch.kv import KVCache

PROMPTS = [f"story {i}: once upon a time a cat" for i in range(5)]


async def outputs(
    tiny: tuple[LLaMAModel, Tokenizer], config: GenerationConfig, **batch: object
) -> tuple[list[list[int]], int]:
    async with BatchProcessor(*tiny, BatchConfig(**batch)) as p:  # type: ignore[arg-type]
        results = await asyncio.gather(
            *(p.submit(BatchRequest(prompt=t, config=config)) for t in PROMPTS)
        )
        p.check_kv()
        return [r.result.token_ids for r in results], p.stats.preemptions


@pytest.mark.parametrize(
    "config",
    [
        GenerationConfig.greedy(max_tokens=48, ignore_eos=True),
        GenerationConfig.balanced(max_tokens=48, seed=7, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
async def test_preempted_sequences_recompute_to_identical_tokens(
    tiny: tuple[LLaMAModel, Tokenizer], config: GenerationConfig
) -> None:
    """Under a budget that forces preemptions, every sequence gives the tokens it gives
    without a budget, greedy and seeded sampling alike."""
    per_token = tiny[0].new_cache(1, 64).nbytes // 64
    common = {
        "strategy": "continuous",
        "max_batch_size": 5,
        "max_context": 128,
        "prefix_cache_mb": 0,
    }
    want, _ = await outputs(tiny, config, **common)
    got, preemptions = await outputs(tiny, config, kv_cache_mb=130 * per_token / 2**20, **common)
    assert preemptions > 0
    assert got == want


def _resident_pages(array: np.ndarray) -> int:
    """Pages of ``array``'s buffer the process holds in memory (libc's mincore)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    size = array.nbytes
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    start = array.ctypes.data
    assert start % mmap.PAGESIZE == 0
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(size), vec) == 0
    return sum(v & 1 for v in vec)


def test_releasing_a_slot_gives_its_pages_back() -> None:
    """Positions written then released stop taking memory, and read as zeros; positions
    kept, and other slots, keep their values."""
    cache = KVCache(n_layers=2, n_kv_heads=2, head_dim=64, n_slots=3, max_context=512)
    for k in cache.k + cache.v:
        k[:, :, :400] = 1.0  # every slot, 400 positions
    before = sum(_resident_pages(a) for a in cache.k + cache.v)
    cache.release(1, keep=100)
    after = sum(_resident_pages(a) for a in cache.k + cache.v)
    # 300 positions x 256 bytes per head, 2 heads, 2 layers, K and V: 150 pages of 4 KiB
    # (less the pages a head shares with a kept position).
    assert before - after >= 140 * 4096 // mmap.PAGESIZE
    for a in cache.k + cache.v:
        assert (a[1, :, :100] == 1.0).all()
        assert (a[1, :, 112:] == 0.0).all()
        assert (a[[0, 2], :, :400] == 1.0).all()


async def test_slots_cost_nothing_until_written(tiny: tuple[LLaMAModel, Tokenizer]) -> None:
    """256 slots of the full context take no memory until a sequence writes to them, and only
    the pages it writes; ending it (without prefix caching) gives them back."""
    config = BatchConfig(max_batch_size=256, max_context=256, prefix_cache=False)
    async with BatchProcessor(*tiny, config) as p:
        arrays = p.engine.cache.k + p.engine.cache.v  # type: ignore[attr-defined]
        assert sum(_resident_pages(a) for a in arrays) == 0
        request = BatchRequest(prompt="a cat " * 50, config=GenerationConfig.greedy(max_tokens=8))
        stream = p.stream(request)
        async for _ in stream:
            if sum(_resident_pages(a) for a in arrays):
                break
        written = sum(_resident_pages(a) for a in arrays)
        assert 0 < written < 64 * len(arrays)  # one slot's first positions, a page or a few
        await stream.aclose()
        await eventually(lambda: p.running == 0)  # the cancellation takes effect between steps
        assert sum(_resident_pages(a) for a in arrays) == 0
