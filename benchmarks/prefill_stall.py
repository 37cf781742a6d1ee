"""How long one long prompt freezes running streams, with and without chunked prefill.

Eight streams decode on the default model under CONTINUOUS batching; then one 512-token prompt
arrives. Measured: the worst inter-token gap any of the eight streams sees from that arrival
until the newcomer's first token (plus a little), with the prompt fed in 64-token chunks versus
the whole prompt in one step. Runs alternate A/B and medians are reported.

    python benchmarks/prefill_stall.py [--repeats 3] [--out benchmarks/results]

Writes ``prefill_stall.json`` and ``prefill_stall.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from zigllama_batch import (
    BatchConfig,
    BatchingStrategy,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    LLaMAModel,
    Tokenizer,
    load_model,
)

STREAMS = 8
LONG_PROMPT_TOKENS = 512
SETUPS = {
    "chunked_64": BatchConfig(
        strategy=BatchingStrategy.CONTINUOUS,
        max_batch_size=16,
        prefill_chunk=64,
        max_step_tokens=64 + STREAMS,
    ),
    "whole_prompt": BatchConfig(
        strategy=BatchingStrategy.CONTINUOUS,
        max_batch_size=16,
        prefill_chunk=1024,
        max_step_tokens=1024 + STREAMS,
    ),
}


def long_prompt(tokenizer: Tokenizer) -> str:
    """A prose prompt of exactly LONG_PROMPT_TOKENS tokens."""
    sentence = (
        "The old lighthouse keeper climbed the spiral stairs every evening, counting the "
        "one hundred and twelve steps while the sea wind rattled the windows. "
    )
    text = sentence * 40
    ids = tokenizer.encode(text)[:LONG_PROMPT_TOKENS]
    text = tokenizer.decode(ids)
    assert len(tokenizer.encode(text)) == LONG_PROMPT_TOKENS
    return text


async def run_once(
    model: LLaMAModel, tokenizer: Tokenizer, config: BatchConfig, prompt: str
) -> dict[str, Any]:
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    async with BatchProcessor(model, tokenizer, config) as p:

        async def consume(i: int) -> None:
            request = BatchRequest(
                prompt=f"Tell me a long story about island number {i}.",
                config=GenerationConfig.greedy(max_tokens=400, ignore_eos=True),
            )
            async for _ in p.stream(request):
                arrivals[i].append(time.perf_counter())
                if min(len(a) for a in arrivals) >= 10:  # all eight decode steadily
                    steady.set()

        steady = asyncio.Event()
        streams = [asyncio.create_task(consume(i)) for i in range(STREAMS)]
        await steady.wait()
        submitted = time.perf_counter()
        newcomer = await p.submit(
            BatchRequest(
                prompt=prompt, config=GenerationConfig.greedy(max_tokens=4, ignore_eos=True)
            )
        )
        first_token = submitted + newcomer.time_to_first_token_ms / 1000
        await asyncio.sleep(0.3)
        for s in streams:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    window_end = first_token + 0.2
    gaps = []
    before = []
    for times in arrivals:
        for a, b in itertools.pairwise(times):
            if b >= submitted and a <= window_end:
                gaps.append(b - a)
            elif b < submitted:
                before.append(b - a)
    return {
        "worst_gap_ms": max(gaps) * 1000,
        "median_gap_before_ms": statistics.median(before) * 1000,
        "newcomer_ttft_ms": newcomer.time_to_first_token_ms,
        "gaps_ms": [g * 1000 for g in gaps],
    }


def plot(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(runs)
    worst = [statistics.median(r["worst_gap_ms"] for r in runs[n]) for n in names]
    base = [statistics.median(r["median_gap_before_ms"] for r in runs[n]) for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], base, width=0.4, label="median gap before the long prompt")
    ax.bar([x + 0.2 for x in xs], worst, width=0.4, label="worst gap after it arrives")
    ax.set_xticks(list(xs), ["64-token chunks", "whole prompt in one step"])
    ax.set_ylabel("inter-token gap of the 8 running streams (ms)")
    ax.set_title(f"One {LONG_PROMPT_TOKENS}-token prompt joins {STREAMS} decoding streams")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    model, tokenizer = load_model(args.model)
    prompt = long_prompt(tokenizer)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETUPS}
    for _ in range(args.repeats):
        for name, config in SETUPS.items():  # A/B interleaved
            r = await run_once(model, tokenizer, config, prompt)
            runs[name].append(r)
            print(
                f"{name:>13}: worst gap {r['worst_gap_ms']:6.0f} ms  (median before "
                f"{r['median_gap_before_ms']:4.0f} ms)  newcomer TTFT {r['newcomer_ttft_ms']:5.0f} ms",
                flush=True,
            )
    summary = {
        name: {
            "worst_gap_ms_median": statistics.median(r["worst_gap_ms"] for r in rs),
            "median_gap_before_ms": statistics.median(r["median_gap_before_ms"] for r in rs),
            "newcomer_ttft_ms_median": statistics.median(r["newcomer_ttft_ms"] for r in rs),
        }
        for name, rs in runs.items()
    }
    ratio = (
        summary["whole_prompt"]["worst_gap_ms_median"]
        / summary["chunked_64"]["worst_gap_ms_median"]
    )
    print(f"\nworst gap, whole prompt / 64-token chunks: {ratio:.1f}x")
    write(Path(args.out), runs, summary, ratio)


def write(out: Path, runs: dict[str, Any], summary: dict[str, Any], ratio: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_stall.json").write_text(
        json.dumps(
            {
                "streams": STREAMS,
                "long_prompt_tokens": LONG_PROMPT_TOKENS,
                "summary": summary,
                "whole_over_chunked_worst_gap": ratio,
                "runs": {
                    k: [{kk: vv for kk, vv in r.items() if kk != "gaps_ms"} for r in v]
                    for k, v in runs.items()
                },
            },
            indent=2,
        )
        + "\n"
    )
    plot(runs, out / "prefill_stall.png")
    print(f"wrote {out / 'prefill_stall.json'} and {out / 'prefill_stall.png'}")


if __name__ == "__main__":
    asyncio.run(main())
