"""The scheduler's own cost: event-loop time per step, with an engine whose step costs nothing.

A BatchProcessor (CONTINUOUS, max batch size 32) runs over an engine that returns a token for
every sequence at once, so everything measured is the event-loop side of a step: building it,
applying the outputs (detokenizing, stop rules, results), reaping and admitting. Reported: the
median over ``--repeats`` runs of wall time per step, and per sequence in a full step. On the
real model a step at batch 32 takes ~100 ms, so this is the share the scheduler adds.

    python benchmarks/scheduler.py [--requests 64] [--tokens 300] [--repeats 5] [--out benchmarks/results]

Writes ``scheduler.json`` into ``--out``. The engine keeps the slot methods that engines had
before the slot table moved to the scheduler, so the same file times older commits too (run it
with ``PYTHONPATH`` pointing at their checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zigllama_batch import (
    BatchConfig,
    BatchingStrategy,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    Tokenizer,
)
from zigllama_batch.engine import SequenceStep, TokenSample
from zigllama_batch.engine.gguf_loader import read_gguf_metadata
from zigllama_batch.engine.hub import default_model_path


class ZeroCostEngine:
    """The engine signature with a step that samples the same token for everyone, at once."""

    def __init__(self, tokenizer: Tokenizer, n_slots: int) -> None:
        self.tokenizer = tokenizer
        self._n_slots = n_slots
        self._token = tokenizer.encode(" the")[0]
        self._free = list(range(n_slots))  # for commits whose scheduler asked the engine

    @property
    def n_slots(self) -> int:
        return self._n_slots

    @property
    def max_context(self) -> int:
        return 2048

    @property
    def model_name(self) -> str:
        return "zero-cost"

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate_slot(self) -> int:
        return heapq.heappop(self._free)

    def free_slot(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def new_sampling(self, config: GenerationConfig, prompt_ids: Sequence[int]) -> Any:
        return config

    def step(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        return [
            TokenSample(self._token, float("nan")) if it.sampling is not None else None
            for it in items
        ]

    def check_structured(self, structured: Any) -> None:
        pass

    def reserve_pool(self, n_blocks: int, block_tokens: int) -> None:
        pass

    def release_kv(self, slot: int, keep: int) -> None:
        pass

    @property
    def kv_bytes_per_token(self) -> int:
        return 46_080


async def run(tokenizer: Tokenizer, requests: int, tokens: int, batch: int) -> dict[str, float]:
    engine = ZeroCostEngine(tokenizer, batch)
    config = BatchConfig(strategy=BatchingStrategy.CONTINUOUS, max_batch_size=batch)
    processor = BatchProcessor.from_engine(engine, config)
    generation = GenerationConfig.greedy(max_tokens=tokens, ignore_eos=True)
    async with processor:
        started = time.perf_counter()
        await asyncio.gather(
            *(
                processor.submit(
                    BatchRequest(prompt=f"Request {i}: hello there", config=generation)
                )
                for i in range(requests)
            )
        )
        elapsed = time.perf_counter() - started
        stats = processor.stats
    return {
        "ms_per_step": elapsed / stats.steps * 1000,
        "mean_batch_size": stats.mean_batch_size,
        "us_per_sequence_step": elapsed / (stats.steps * stats.mean_batch_size) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=300, help="tokens generated per request")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    tokenizer = Tokenizer(read_gguf_metadata(default_model_path()))
    runs = [
        asyncio.run(run(tokenizer, args.requests, args.tokens, args.batch))
        for _ in range(args.repeats)
    ]
    ms = statistics.median(r["ms_per_step"] for r in runs)
    us = statistics.median(r["us_per_sequence_step"] for r in runs)
    print("run   ms/step  us/sequence-step  mean batch")
    for i, r in enumerate(runs):
        print(
            f"{i:>3} {r['ms_per_step']:>9.3f} {r['us_per_sequence_step']:>17.1f} "
            f"{r['mean_batch_size']:>11.1f}"
        )
    print(f"median {ms:.3f} ms per step, {us:.1f} us per sequence and step")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine()},
        "requests": args.requests,
        "tokens_per_request": args.tokens,
        "max_batch_size": args.batch,
        "runs": runs,
        "median_ms_per_step": ms,
        "median_us_per_sequence_step": us,
    }
    (out / "scheduler.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'scheduler.json'}")


if __name__ == "__main__":
    main()
