"""A flood of long prompts under a key/value memory budget: every request completes, resident
memory stays under the weights plus the budget plus a fixed margin, and falls back after.

One process loads the model, measures its resident memory after load (the weights) and after
one warm-up request of the same length (the fixed margin, beyond its own keys and values:
compiled kernels, the prefill's scratch buffers, logits), then streams
``--requests`` requests of ``--prompt-tokens`` random token ids each (no shared prefixes) at
once into a processor with ``kv_cache_mb=--kv-cache-mb``, sampling resident memory every 0.2 s.
Reported: completions, preemptions, peak and final resident memory against the bound (and the
final one against the weights, the margin and the keys and values still kept), time.
Then the first ``--check`` prompts run again, one at a time, without a budget: their greedy
tokens must be the ones the flood gave.

    python benchmarks/kv_budget.py --model gemma-3-270m --requests 64 --prompt-tokens 4000 \\
        --kv-cache-mb 2048
    python benchmarks/kv_budget.py --model smollm2-135m --requests 32 --prompt-tokens 3000 \\
        --kv-cache-mb 512
    python benchmarks/kv_budget.py --requests 16 --prompt-tokens 400 --max-tokens 300 \\
        --kv-cache-mb 64 --unbounded-too   # long outputs: preemptions, and what they cost

Writes ``benchmarks/results/kv_budget-NAME-REQUESTSxTOKENS.json`` and ``.png`` (resident memory
over time).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from zigllama_batch import (
    BatchConfig,
    BatchingStrategy,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    load_model,
)
from zigllama_batch.kv import KVStats
from zigllama_batch.testing import cpu_name

SAMPLE_S = 0.2


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Sampler:
    """Resident memory every ``SAMPLE_S`` seconds on a thread, with the time since start."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.start, rss_mib()))
            self._stop.wait(SAMPLE_S)

    def mark(self) -> float:
        return time.perf_counter() - self.start

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def flood(
    p: BatchProcessor, prompts: list[list[int]], max_tokens: int
) -> list[list[int] | BaseException]:
    config = GenerationConfig.greedy(max_tokens=max_tokens, ignore_eos=True)

    async def one(prompt: list[int]) -> list[int]:
        stream = p.stream(BatchRequest(prompt=prompt, config=config))
        async for _ in stream:
            pass
        assert stream.result is not None
        return list(stream.result.result.token_ids)

    return await asyncio.gather(*(one(t) for t in prompts), return_exceptions=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sampler = Sampler()
    model, tokenizer = load_model(args.model, progress=False)
    weights = rss_mib()
    context = args.prompt_tokens + args.max_tokens + 16
    rng = np.random.default_rng(0)
    prompts = [
        [int(t) for t in rng.integers(1000, 20000, args.prompt_tokens)]
        for _ in range(args.requests)
    ]
    config = BatchConfig(
        strategy=BatchingStrategy.CONTINUOUS,
        max_batch_size=args.requests,
        max_context=context,
        max_step_tokens=max(512, args.requests),
        kv_cache_mb=args.kv_cache_mb,
    )
    async with BatchProcessor(model, tokenizer, config) as p:
        # Warm-up on a prompt as long as the others (kernels compiled, the prefill's scratch
        # buffers made once): what it adds beyond its own keys and values is the margin.
        warm = [int(t) for t in rng.integers(1000, 20000, args.prompt_tokens)]
        await flood(p, [warm], 4)
        held = p.kv_stats()
        margin = rss_mib() - weights - _kv_mib(held)
        began = sampler.mark()
        outputs = await flood(p, prompts, args.max_tokens)
        ended = sampler.mark()
        stats = p.stats
        await asyncio.sleep(1.0)
        after = rss_mib()
        kv = p.kv_stats()
    flood_samples = [m for t, m in sampler.samples if began <= t <= ended + 1.0]
    peak = max(flood_samples, default=after)
    sampler.stop()
    failures = [repr(o) for o in outputs if isinstance(o, BaseException)]
    unbounded_s = None
    if args.unbounded_too:  # the same flood without a budget: what the bound costs in time
        free_flood = dataclasses.replace(config, kv_cache_mb=None)
        async with BatchProcessor(model, tokenizer, free_flood) as q:
            began_free = time.perf_counter()
            await flood(q, prompts, args.max_tokens)
            unbounded_s = time.perf_counter() - began_free
    # The same prompts alone, without a budget: the greedy tokens must not change.
    same = []
    free = BatchConfig(strategy=BatchingStrategy.CONTINUOUS, max_batch_size=1, max_context=context)
    async with BatchProcessor(model, tokenizer, free) as q:
        for i in range(min(args.check, len(prompts))):
            alone = (await flood(q, [prompts[i]], args.max_tokens))[0]
            same.append(alone == outputs[i])
    bound = weights + args.kv_cache_mb + margin
    retained = _kv_mib(kv)
    return {
        "machine": {"cpu": cpu_name(), "python": platform.python_version()},
        "model": model.config.name,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "kv_cache_mb": args.kv_cache_mb,
        "completed": sum(not isinstance(o, BaseException) for o in outputs),
        "failed": failures,
        "preemptions": stats.preemptions,
        "flood_s": ended - began,
        "unbounded_flood_s": unbounded_s,
        "rss_weights_mib": weights,
        "fixed_margin_mib": margin,
        "rss_bound_mib": bound,
        "rss_peak_mib": peak,
        "rss_after_mib": after,
        "retained_kv_mib": retained,
        "outputs_identical_alone": same,
        "samples": sampler.samples,
        "flood_window_s": [began, ended],
    }


def _kv_mib(kv: KVStats) -> float:
    """Key/value memory held (slots and pool), MiB."""
    return (kv.used_tokens * kv.bytes_per_token + kv.pool_bytes) / 2**20


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, m = zip(*result["samples"], strict=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, m, label="resident memory")
    ax.axhline(result["rss_bound_mib"], color="red", ls="--", label="weights + budget + margin")
    ax.axhline(result["rss_weights_mib"], color="gray", ls=":", label="weights")
    ax.axvspan(*result["flood_window_s"], color="orange", alpha=0.15, label="flood")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(
        f"{result['model']}: {result['requests']} x {result['prompt_tokens']}-token prompts, "
        f"kv_cache_mb={result['kv_cache_mb']:g}"
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=3000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-mb", type=float, default=512)
    ap.add_argument(
        "--unbounded-too", action="store_true", help="time the same flood without a budget"
    )
    ap.add_argument("--check", type=int, default=3, help="prompts rerun alone, unbounded")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    rows = [
        ("completed", f"{result['completed']} of {result['requests']}"),
        ("failed", str(len(result["failed"]))),
        ("preemptions", str(result["preemptions"])),
        ("flood", f"{result['flood_s']:.0f} s"),
        (
            "same flood without a budget",
            "-"
            if result["unbounded_flood_s"] is None
            else f"{result['unbounded_flood_s']:.0f} s (goodput under the budget: "
            f"{result['unbounded_flood_s'] / result['flood_s']:.0%})",
        ),
        ("weights (RSS after load)", f"{result['rss_weights_mib']:.0f} MiB"),
        ("fixed margin (after warm-up)", f"{result['fixed_margin_mib']:.0f} MiB"),
        ("bound: weights + budget + margin", f"{result['rss_bound_mib']:.0f} MiB"),
        ("peak RSS during the flood", f"{result['rss_peak_mib']:.0f} MiB"),
        ("RSS 1 s after", f"{result['rss_after_mib']:.0f} MiB"),
        ("KV retained after (prefixes, pool)", f"{result['retained_kv_mib']:.0f} MiB"),
        (
            "weights + margin + retained",
            f"{result['rss_weights_mib'] + result['fixed_margin_mib'] + result['retained_kv_mib']:.0f} MiB",
        ),
        ("greedy tokens as alone, unbounded", str(result["outputs_identical_alone"])),
    ]
    print(f"{result['model']} on {result['machine']['cpu']}")
    for name, value in rows:
        print(f"  {name:<36} {value}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kv_budget-{result['model']}-{result['requests']}x{result['prompt_tokens']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
