"""The Model protocol is the whole seam for another architecture: a model that is nothing like
LLaMA, written only against the protocol, runs through TextGenerator and BatchProcessor with no
change to the engine or the scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    LLaMAModel,
    TextGenerator,
    Tokenizer,
)
from zigllama_batch.engine import Model, SequenceStep
from zigllama_batch.kv import KVCache

Tiny = tuple[LLaMAModel, Tokenizer]


@dataclass(frozen=True)
class CountingConfig:
    vocab_size: int
    name: str = "counting"
    context_length: int = 128


class CountingModel:
    """Predicts the last token plus one, and remembers (in its cache) how many tokens each
    slot was fed: enough state to show the engine hands it the right slots and positions."""

    def __init__(self, vocab_size: int) -> None:
        self.config = CountingConfig(vocab_size)

    def new_cache(self, n_slots: int, max_context: int | None = None) -> KVCache:
        context = max_context or self.config.context_length
        return KVCache(n_layers=1, n_kv_heads=1, head_dim=2, n_slots=n_slots, max_context=context)

    def step(self, items: Sequence[SequenceStep], cache: KVCache) -> NDArray[np.float32]:
        logits = np.zeros((len(items), self.config.vocab_size), np.float32)
        for i, item in enumerate(items):
            n = len(item.token_ids)
            positions = np.arange(item.start_pos, item.start_pos + n)
            cache.k[0][item.slot, 0, positions, 0] = np.asarray(item.token_ids) + 1.0
            # every earlier position of this slot was written by an earlier step
            assert np.all(cache.k[0][item.slot, 0, : item.start_pos, 0] > 0)
            logits[i, (item.token_ids[-1] + 1) % self.config.vocab_size] = 10.0
        return logits


def expected(tok: Tokenizer, prompt: str, n: int) -> list[int]:
    last = tok.encode(prompt)[-1]
    return [(last + 1 + i) % tok.vocab_size for i in range(n)]


async def test_a_model_written_to_the_protocol_runs_alone_and_batched(tiny: Tiny) -> None:
    """TextGenerator and BatchProcessor (continuous, chunked prompts) give the counting model's
    tokens for every prompt."""
    tok = tiny[1]
    model: Model = CountingModel(tok.vocab_size)
    config = GenerationConfig.greedy(max_tokens=6, ignore_eos=True)
    prompts = ["the cat", "she ran off", "a mat and the cat sat"]
    gen = TextGenerator(model, tok, prefill_chunk=3)
    assert [list(gen.generate(p, config).token_ids) for p in prompts] == [
        expected(tok, p, 6) for p in prompts
    ]
    batch = BatchConfig(strategy="continuous", max_batch_size=2, prefill_chunk=2)
    async with BatchProcessor(model, tok, batch) as processor:
        results = await asyncio.gather(
            *(processor.submit(BatchRequest(prompt=p, config=config)) for p in prompts)
        )
        assert processor.model_name == "counting"
    assert [list(r.result.token_ids) for r in results] == [expected(tok, p, 6) for p in prompts]
