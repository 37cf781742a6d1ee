"""Batching strategies compared on one seeded arrival trace, on the default model.

The same trace (Poisson arrivals; prompt lengths 8 + exponential, mean 40 tokens by default;
output lengths drawn from an exponential distribution, mean 64, capped at 256, generated in full
with ``ignore_eos``) is
replayed through each strategy at max batch size 32 and through a no-batching baseline (one
request at a time), at several arrival rates. Reported per run: output tokens/s over the
makespan, p50/p99 latency and time to first token, mean batch size; for CONTINUOUS at
saturation also the scheduler's own time per step and the host loop's wake-up lag.

    python benchmarks/strategies.py [--requests 48] [--rates 1,2,4,inf] [--out benchmarks/results]

Writes ``strategies.json`` and ``strategies.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
from zigllama_batch.engine import Engine, SequenceStep, TokenSample
from zigllama_batch.testing import LoopLagProbe

WORDS = [
    "the",
    "river",
    "light",
    "house",
    "stone",
    "garden",
    "winter",
    "market",
    "letter",
    "music",
    "window",
    "story",
    "bridge",
    "forest",
    "summer",
    "engine",
    "paper",
    "island",
    "mountain",
    "village",
    "kitchen",
    "table",
    "morning",
    "evening",
    "question",
    "answer",
    "teacher",
    "student",
    "history",
    "science",
    "number",
    "little",
    "great",
    "small",
    "old",
    "new",
]


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt: str
    max_tokens: int


def make_trace(n: int, rate: float, seed: int, prompt_mean: float = 40.0) -> list[Arrival]:
    """``n`` arrivals at ``rate`` per second (inf: all at once). Prompt lengths are
    8 + exponential (mean ``prompt_mean`` - 8) words, capped at 384, about one token per word;
    output lengths exponential, mean 64, capped at 256. The same seed gives the same prompts
    and lengths for every rate."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.ceil(rng.exponential(64, n)), 256).astype(int)
    words = np.minimum(8 + np.round(rng.exponential(max(prompt_mean - 8, 1), n)), 384).astype(int)
    gaps = rng.exponential(1.0, n)
    out = []
    t = 0.0
    for i in range(n):
        body = " ".join(rng.choice(WORDS, int(words[i])))
        out.append(Arrival(t, f"Request {i}: {body}", int(max(lengths[i], 1))))
        if math.isfinite(rate):
            t += gaps[i] / rate
    return out


class TimedEngine:
    """An Engine whose steps record their start and end (perf_counter), for the scheduler's
    overhead: the time between one step's end and the next one's start."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.tokenizer = engine.tokenizer
        self.spans: list[tuple[float, float, int]] = []
        self.sampled: list[tuple[float, int]] = []  # (step end, tokens sampled in it)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property
    def n_slots(self) -> int:
        return self._engine.n_slots

    @property
    def max_context(self) -> int:
        return self._engine.max_context

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    def step(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        t0 = time.perf_counter()
        out = self._engine.step(items)
        self.spans.append((t0, time.perf_counter(), len(items)))
        self.sampled.append((time.perf_counter(), sum(o is not None for o in out)))
        return out


async def run_trace(
    model: LLaMAModel,
    tokenizer: Tokenizer,
    config: BatchConfig,
    trace: list[Arrival],
    *,
    measure_loop: bool = False,
) -> dict[str, Any]:
    engine = TimedEngine(Engine(model, tokenizer, n_slots=config.max_batch_size))
    processor = BatchProcessor.from_engine(engine, config)
    probe = LoopLagProbe()
    async with processor, probe if measure_loop else contextlib.nullcontext():
        start = time.perf_counter()
        tasks = []
        for a in trace:
            delay = start + a.at_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = BatchRequest(
                prompt=a.prompt,
                config=GenerationConfig.greedy(max_tokens=a.max_tokens, ignore_eos=True),
            )
            tasks.append(asyncio.create_task(processor.submit(request)))
        await processor.aclose()  # drain: FIXED_SIZE runs its last partial batch
        results = [await t for t in tasks]
        makespan = time.perf_counter() - start
        stats = processor.stats
    tokens = sum(r.result.completion_tokens for r in results)
    # Saturated throughput: tokens generated until the queue drained for good (the last
    # admission), which leaves out the ramp-down where the longest requests finish alone.
    wall_start = start
    last_admit = max(
        r.timeline.admitted - r.timeline.submitted + a.at_s
        for r, a in zip(results, trace, strict=True)
    )
    steady_end = wall_start + last_admit
    steady_tokens = sum(n for t, n in engine.sampled if t <= steady_end)
    lat = sorted(r.latency_ms for r in results)
    ttft = sorted(r.time_to_first_token_ms for r in results)
    out: dict[str, Any] = {
        "strategy": config.strategy.value if config.max_batch_size > 1 else "no_batching",
        "max_batch_size": config.max_batch_size,
        "requests": len(results),
        "tokens": tokens,
        "makespan_s": makespan,
        "tokens_per_s": tokens / makespan,
        "steady_tokens_per_s": steady_tokens / last_admit if last_admit > 0 else float("nan"),
        "steady_window_s": last_admit,
        "latency_p50_ms": _pct(lat, 50),
        "latency_p99_ms": _pct(lat, 99),
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p99_ms": _pct(ttft, 99),
        "mean_batch_size": stats.mean_batch_size,
    }
    spans = engine.spans
    if len(spans) > 3:
        # Scheduler time per step: gap from a step's end to the next step's start, while busy.
        gaps = [(b[0] - a[1], a[2]) for a, b in itertools.pairwise(spans)]
        steps = [(end - begin, n) for begin, end, n in spans]
        big = [g for g, n in gaps if n >= 24]
        big_steps = [s for s, n in steps if n >= 24]
        if big and big_steps:
            out["scheduler_ms_per_step_at_batch_24plus"] = statistics.median(big) * 1000
            out["step_ms_at_batch_24plus"] = statistics.median(big_steps) * 1000
            out["scheduler_share_of_step"] = statistics.median(big) / statistics.median(big_steps)
    lags = sorted(probe.lags_s)
    if measure_loop and lags:
        out["loop_lag_p50_ms"] = _pct(lags, 50) * 1000
        out["loop_lag_p99_ms"] = _pct(lags, 99) * 1000
    return out


def _pct(sorted_values: list[float], q: float) -> float:
    return float(np.percentile(sorted_values, q)) if sorted_values else 0.0


def _median_at(rows: list[dict[str, Any]], rate: float, key: str) -> float:
    values = [r[key] for r in rows if r["rate"] == rate]
    return statistics.median(values) if values else math.nan


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = sorted({r["strategy"] for r in rows})
    rates = sorted({r["rate"] for r in rows})
    xs = list(range(len(rates)))
    labels = ["all at once" if not math.isfinite(r) else f"{r:g}/s" for r in rates]
    for name in names:
        mine = [r for r in rows if r["strategy"] == name]
        for ax, key, title in zip(
            axes,
            ["tokens_per_s", "ttft_p99_ms", "latency_p99_ms"],
            ["throughput (output tokens/s)", "p99 time to first token (ms)", "p99 latency (ms)"],
            strict=True,
        ):
            ax.plot(
                xs,
                [_median_at(mine, rate, key) for rate in rates],
                marker="o",
                label=name,
            )
            ax.set_title(title)
            ax.set_xticks(xs, labels)
            ax.set_xlabel("arrival rate")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.suptitle("Batching strategies, SmolLM2-135M (numpy, 2 CPU cores), max batch size 32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=40, help="requests per finite-rate trace")
    ap.add_argument(
        "--saturation-requests",
        type=int,
        default=96,
        help="requests arriving all at once (rate inf)",
    )
    ap.add_argument(
        "--rates", default="1,2,4,inf", help="arrival rates per second (inf: all at once)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each batching strategy at saturation, interleaved (the ratios are the "
        "median over them; the slow no-batching baseline runs once)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument(
        "--prompt-mean",
        type=float,
        default=40.0,
        help="mean prompt length in words (about one token each)",
    )
    ap.add_argument("--only", nargs="*", help="run only these strategies (no_batching, ...)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    model, tokenizer = load_model(args.model)
    b = args.max_batch_size
    configs = [
        # The no-batching baseline: one request at a time.
        BatchConfig(strategy=BatchingStrategy.CONTINUOUS, max_batch_size=1),
        BatchConfig(strategy=BatchingStrategy.FIXED_SIZE, max_batch_size=b),
        BatchConfig(strategy=BatchingStrategy.DYNAMIC_TIMEOUT, max_batch_size=b, timeout_ms=500),
        BatchConfig(strategy=BatchingStrategy.ADAPTIVE, max_batch_size=b, latency_target_ms=20_000),
        BatchConfig(strategy=BatchingStrategy.CONTINUOUS, max_batch_size=b),
    ]
    if args.only:
        configs = [
            c
            for c in configs
            if (c.strategy.value if c.max_batch_size > 1 else "no_batching") in args.only
        ]
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    for rate in rates:
        n = args.requests if math.isfinite(rate) else args.saturation_requests
        trace = make_trace(n, rate, args.seed, args.prompt_mean)
        saturated = not math.isfinite(rate)
        # Every strategy sees the same trace, back to back; at saturation the batching
        # strategies take turns ``--repeats`` times, so a slow spell of this shared machine
        # falls on all of them rather than on one.
        runs = [
            (repeat, config)
            for repeat in range(args.repeats if saturated else 1)
            for config in configs
            if repeat == 0 or config.max_batch_size > 1
        ]
        for repeat, config in runs:
            row = await run_trace(
                model,
                tokenizer,
                config,
                trace,
                measure_loop=saturated and config.max_batch_size > 1,
            )
            row["rate"] = rate
            row["repeat"] = repeat
            rows.append(row)
            print(
                f"rate {rate:>4g}/s #{repeat} {row['strategy']:>16}: "
                f"{row['tokens_per_s']:6.1f} tok/s "
                f"(saturated {row['steady_tokens_per_s']:6.1f})  "
                f"latency p50/p99 {row['latency_p50_ms']:7.0f}/{row['latency_p99_ms']:7.0f} ms  "
                f"TTFT p50/p99 {row['ttft_p50_ms']:7.0f}/{row['ttft_p99_ms']:7.0f} ms  "
                f"batch {row['mean_batch_size']:4.1f}",
                flush=True,
            )
    write_results(Path(args.out), rows, args)


def write_results(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    (out / "strategies.json").write_text(
        json.dumps(
            {
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                },
                "trace": {
                    "requests": args.requests,
                    "repeats_at_saturation": args.repeats,
                    "saturation_requests": args.saturation_requests,
                    "seed": args.seed,
                    "output_tokens": "exponential, mean 64, capped at 256, ignore_eos",
                    "prompt_tokens": "8 + exponential, capped at 384 (one token per word)",
                    "first": [asdict(a) for a in make_trace(3, 1.0, args.seed)],
                },
                "runs": [
                    {**r, "rate": r["rate"] if math.isfinite(r["rate"]) else "inf"} for r in rows
                ],
                "summary": summary,
            },
            indent=2,
        )
        + "\n"
    )
    plot(rows, out / "strategies.png")
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    print(f"\nwrote {out / 'strategies.json'} and {out / 'strategies.png'}")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ratios the targets are stated in: at saturation, the median over the repeats of
    CONTINUOUS against each other strategy run next to it (the once-run baseline for all)."""
    out: dict[str, Any] = {}
    sat = [r for r in rows if not math.isfinite(r["rate"])]
    once = {r["strategy"]: r for r in sat if r["repeat"] == 0}
    turns = [  # each turn's run of every strategy, by name
        once | {r["strategy"]: r for r in sat if r["repeat"] == repeat}
        for repeat in sorted({r["repeat"] for r in sat})
    ]
    for key, label in (("steady_tokens_per_s", "steady"), ("tokens_per_s", "makespan")):
        for other in ("no_batching", "fixed_size", "dynamic_timeout", "adaptive"):
            ratios = []
            for by in turns:
                if "continuous" in by and other in by and by[other][key] > 0:
                    ratios.append(round(by["continuous"][key] / by[other][key], 2))
            if ratios:
                out[f"continuous_over_{other}_{label}"] = statistics.median(ratios)
                out[f"continuous_over_{other}_{label}_each"] = ratios
    ttft_wins = []
    for rate, repeat in sorted({(r["rate"], r["repeat"]) for r in rows}):
        at = {r["strategy"]: r for r in rows if r["rate"] == rate and r["repeat"] == repeat}
        if "continuous" in at:
            statics = [
                at[s]["ttft_p99_ms"]
                for s in ("fixed_size", "dynamic_timeout", "adaptive")
                if s in at
            ]
            ttft_wins.append(bool(statics) and at["continuous"]["ttft_p99_ms"] < min(statics))
    out["continuous_lowest_p99_ttft_at_every_rate"] = all(ttft_wins)
    continuous = [r for r in sat if r["strategy"] == "continuous"]
    for key in (
        "scheduler_share_of_step",
        "scheduler_ms_per_step_at_batch_24plus",
        "step_ms_at_batch_24plus",
        "loop_lag_p50_ms",
        "loop_lag_p99_ms",
    ):
        values = [r[key] for r in continuous if key in r]
        if values:
            out[f"continuous_{key}"] = round(statistics.median(values), 4)
    return out


if __name__ == "__main__":
    asyncio.run(main())
