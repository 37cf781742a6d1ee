"""Prefix caching on versus off, on the default model, interleaved in one run.

Scenarios (each run with ``prefix_cache`` on and off, alternating, ``--repeats`` times):

1. ``shared_system``: 32 concurrent clients, one ~1,000-token system prompt, distinct ~50-token
   questions, 32 output tokens each (greedy, EOS ignored). Reported: median time to first
   token, output tokens per second over the wave, prompt tokens served from the cache. Each
   processor serves two such waves with different system prompts; the second is the one
   measured (a running server's), the first is reported as ``first_wave_*`` (a new processor's,
   which also pays for the OS mapping the cache's memory as it is first written).
2. ``chat_turns``: 8 conversations x 6 turns at once; each turn's prompt is the chat so far
   rendered with the model's template (the previous answers as the model gave them) plus a new
   user message, 24 output tokens. Reported: median time to first token per turn, and the
   share of each turn's prompt served from the cache.
3. ``rotation``: 8 distinct ~500-token system prompts taking turns on 4 slots, 3 rounds, 8
   output tokens. Reported: the share of the system prompts' tokens served from the cache
   after the first round (the slots hold 4 of them; the rest come from the host-memory pool),
   the pool's bytes, and the process's resident memory.
4. ``no_sharing``: 32 requests at once with prompts that share nothing (~100 tokens each, 32
   output tokens). Reported: output tokens per second, to show that lookups and bookkeeping
   cost nothing measurable.
5. ``ideal_schedule``: the bound on scenario 1's ratio: the model steps that the median request
   must wait for under the best possible schedule, with and without the cache, timed alone.

    python benchmarks/prefix_cache.py [--repeats 2] [--scenarios shared_system chat_turns]

Writes ``prefix_cache.json`` (updating only the scenarios run) and ``prefix_cache.png`` into
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
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
from zigllama_batch.engine import SequenceStep

CLIENTS = 32
SYSTEM_TOKENS = 1000
QUESTION_TOKENS = 50
CONVERSATIONS = 8
TURNS = 6
TOPICS = ["the sea", "mountains", "a library", "the moon", "bread", "rivers", "trains", "bees"]


def _config(prefix_cache: bool) -> BatchConfig:
    return BatchConfig(
        strategy=BatchingStrategy.CONTINUOUS, max_batch_size=CLIENTS, prefix_cache=prefix_cache
    )


def _text_of(tokenizer: Tokenizer, sentence: str, tokens: int) -> str:
    """Prose of exactly ``tokens`` tokens, from repeating ``sentence``."""
    ids = tokenizer.encode(sentence * (tokens // 4 + 8))[:tokens]
    return tokenizer.decode(ids)


async def shared_system(model: LLaMAModel, tokenizer: Tokenizer, on: bool) -> dict[str, Any]:
    greedy = GenerationConfig.greedy(max_tokens=32, ignore_eos=True)

    async def wave(p: BatchProcessor, system: str, topic: str) -> dict[str, Any]:
        questions = [
            _text_of(tokenizer, f"Question {i}: can I {topic} number {i * 7} for a week? ", 50)
            for i in range(CLIENTS)
        ]
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                p.submit(
                    BatchRequest(
                        prompt=[
                            {"role": "system", "content": system},
                            {"role": "user", "content": q},
                        ],
                        config=greedy,
                    )
                )
                for q in questions
            )
        )
        wall = time.perf_counter() - started
        return {
            "ttft_ms_median": statistics.median(r.time_to_first_token_ms for r in results),
            "output_tokens_per_s": sum(r.result.completion_tokens for r in results) / wall,
            "wall_s": wall,
            "prompt_tokens": sum(r.result.prompt_tokens for r in results),
            "cached_tokens": sum(r.result.cached_tokens for r in results),
        }

    first_system = _text_of(
        tokenizer,
        "Welcome to the front desk of the city museum: give short answers about tickets, "
        "tours, opening hours and the cloakroom, and name the rule that applies. ",
        SYSTEM_TOKENS,
    )
    system = _text_of(
        tokenizer,
        "You are the help desk of a large public library; answer politely, cite the rules "
        "about loans, fines, opening hours and rooms when they apply, and keep it short. ",
        SYSTEM_TOKENS,
    )
    async with BatchProcessor(model, tokenizer, _config(on)) as p:
        # The first wave of a new processor also pays for the OS mapping its cache slots'
        # memory as it is first written; the second, with another system prompt, is what a
        # server that has been running sees.
        first = await wave(p, first_system, "rent room")
        measured = await wave(p, system, "borrow item")
    return {**measured, **{f"first_wave_{k}": v for k, v in first.items()}}


async def chat_turns(model: LLaMAModel, tokenizer: Tokenizer, on: bool) -> dict[str, Any]:
    greedy = GenerationConfig.greedy(max_tokens=24)
    ttft: list[list[float]] = [[] for _ in range(TURNS)]
    reuse: list[list[float]] = [[] for _ in range(TURNS)]
    of_previous: list[list[float]] = [[] for _ in range(TURNS - 1)]

    async def conversation(p: BatchProcessor, topic: str) -> None:
        messages = [{"role": "system", "content": "You are a friendly, concise assistant."}]
        previous = 0  # tokens the previous turn left in its slot: prompt and answer
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"Tell me one more fact about {topic}."})
            r = await p.submit(BatchRequest(prompt=list(messages), config=greedy))
            ttft[turn].append(r.time_to_first_token_ms)
            reuse[turn].append(r.result.cached_tokens / r.result.prompt_tokens)
            if turn:
                of_previous[turn - 1].append(r.result.cached_tokens / previous)
            previous = r.result.prompt_tokens + r.result.completion_tokens
            messages.append({"role": "assistant", "content": r.result.text})

    async with BatchProcessor(model, tokenizer, _config(on)) as p:
        await asyncio.gather(*(conversation(p, topic) for topic in TOPICS[:CONVERSATIONS]))
    return {
        "ttft_ms_median_by_turn": [statistics.median(t) for t in ttft],
        "cached_share_median_by_turn": [statistics.median(r) for r in reuse],
        "share_of_previous_turn_reused_median": [statistics.median(r) for r in of_previous],
    }


async def rotation(model: LLaMAModel, tokenizer: Tokenizer, on: bool) -> dict[str, Any]:
    import psutil

    systems = [
        _text_of(tokenizer, f"Rule set {i}: {TOPICS[i]} matter above all else here. ", 500)
        for i in range(8)
    ]
    greedy = GenerationConfig.greedy(max_tokens=8, ignore_eos=True)
    config = BatchConfig(strategy=BatchingStrategy.CONTINUOUS, max_batch_size=4, prefix_cache=on)
    system_tokens = [
        len(tokenizer.encode_prompt([{"role": "system", "content": s}])) for s in systems
    ]
    _release_freed_memory()  # what earlier scenarios freed must not count as shrinking here
    rss_before = psutil.Process().memory_info().rss
    later_hits = later_total = 0
    started = time.perf_counter()
    async with BatchProcessor(model, tokenizer, config) as p:
        for round_ in range(3):
            results = await asyncio.gather(
                *(
                    p.submit(
                        BatchRequest(
                            prompt=[
                                {"role": "system", "content": s},
                                {"role": "user", "content": f"Round {round_}: go on."},
                            ],
                            config=greedy,
                        )
                    )
                    for s in systems
                )
            )
            if round_:
                later_hits += sum(
                    min(r.result.cached_tokens, n)
                    for r, n in zip(results, system_tokens, strict=True)
                )
                later_total += sum(system_tokens)
        kv = p.kv_stats()
        pool_bytes, evictions = kv.pool_bytes, kv.pool_evictions
        rss_after = psutil.Process().memory_info().rss
    return {
        "system_tokens_hit_share_after_round_1": later_hits / later_total,
        "wall_s": time.perf_counter() - started,
        "pool_bytes": pool_bytes,
        "pool_evictions": evictions,
        "pool_limit_bytes": int(config.prefix_cache_mb * 2**20) if on else 0,
        "rss_growth_bytes": rss_after - rss_before,
    }


def _release_freed_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc only)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(libc).malloc_trim(0)


async def no_sharing(model: LLaMAModel, tokenizer: Tokenizer, on: bool) -> dict[str, Any]:
    words = ["amber", "basalt", "cedar", "dune", "ember", "fjord", "glacier", "harbor", "iris"]
    prompts = [
        _text_of(
            tokenizer, " ".join(words[(i + j) % len(words)] for j in range(9)) + f" {i}. ", 100
        )
        for i in range(CLIENTS)
    ]
    greedy = GenerationConfig.greedy(max_tokens=32, ignore_eos=True)
    async with BatchProcessor(model, tokenizer, _config(on)) as p:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(p.submit(BatchRequest(prompt=q, config=greedy)) for q in prompts)
        )
        wall = time.perf_counter() - started
    return {
        "output_tokens_per_s": sum(r.result.completion_tokens for r in results) / wall,
        "cached_tokens": sum(r.result.cached_tokens for r in results),
        "wall_s": wall,
    }


async def ideal_schedule(model: LLaMAModel, tokenizer: Tokenizer, on: bool) -> dict[str, Any]:
    """The ``shared_system`` prompts straight on the model, with no scheduler and no decoding:
    how soon the 16th of 32 requests (the median) could have its first token at best. With the
    cache: the first prompt whole, then 15 others after copying the shared prefix (their
    endings in steps of up to 512 tokens, as the processor batches them). Without: 16 whole
    prompts one after another (with equal prompts, first come first served is the fastest
    way to the 16th)."""
    system = _text_of(
        tokenizer,
        "You are the help desk of a large public library; answer politely, cite the rules "
        "about loans, fines, opening hours and rooms when they apply, and keep it short. ",
        SYSTEM_TOKENS,
    )
    prompts = [
        tokenizer.encode_prompt(
            [
                {"role": "system", "content": system},
                {
                    "role": "user",
                    "content": _text_of(
                        tokenizer, f"Question {i}: can I borrow item number {i * 7}? ", 50
                    ),
                },
            ]
        )
        for i in range(CLIENTS // 2)
    ]
    shared = 0
    while all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    cache = model.new_cache(len(prompts), 2048)

    def prefill(slot: int, ids: list[int], start: int = 0) -> None:
        for s in range(start, len(ids), 512):
            model.step([SequenceStep(slot, ids[s : s + 512], s)], cache)

    def run() -> None:
        if not on:
            for prompt in prompts:
                prefill(0, prompt)
            return
        prefill(0, prompts[0])
        steps: list[list[SequenceStep]] = [[]]
        for slot, prompt in enumerate(prompts[1:], start=1):
            cache.copy_prefix(0, slot, shared)
            if sum(len(it.token_ids) for it in steps[-1]) + len(prompt) - shared > 512:
                steps.append([])
            steps[-1].append(SequenceStep(slot, prompt[shared:], shared))
        for items in steps:
            model.step(items, cache)

    started = time.perf_counter()
    await asyncio.to_thread(run)
    return {"median_request_first_token_s": time.perf_counter() - started, "shared": shared}


SCENARIOS = {
    "shared_system": shared_system,
    "chat_turns": chat_turns,
    "rotation": rotation,
    "no_sharing": no_sharing,
    "ideal_schedule": ideal_schedule,
}


async def main_async(repeats: int, scenarios: list[str]) -> dict[str, Any]:
    model, tokenizer = load_model()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"on": [], "off": []} for s in scenarios}
    for _ in range(repeats):
        for name in scenarios:
            for on in (True, False):  # interleaved: each round runs both
                result = await SCENARIOS[name](model, tokenizer, on)
                runs[name]["on" if on else "off"].append(result)
                print(name, "on" if on else "off", json.dumps(result), flush=True)
    return runs


def _medians(runs: dict[str, list[dict[str, Any]]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Per mode (cache on and off), the median of each of ``keys`` over the rounds."""
    return {mode: {k: _median_of(rows, k) for k in keys} for mode, rows in runs.items()}


def _median_of(rows: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in rows]
    if isinstance(values[0], list):
        return [statistics.median(v) for v in zip(*values, strict=True)]
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    runs = asyncio.run(main_async(args.repeats, args.scenarios))
    summary: dict[str, Any] = {}
    if "shared_system" in runs:
        keys = (
            "ttft_ms_median",
            "output_tokens_per_s",
            "wall_s",
            "cached_tokens",
            "first_wave_ttft_ms_median",
            "first_wave_output_tokens_per_s",
        )
        summary["shared_system"] = _medians(runs["shared_system"], keys)
        s = summary["shared_system"]
        s["ttft_ratio_off_over_on"] = s["off"]["ttft_ms_median"] / s["on"]["ttft_ms_median"]
        s["throughput_ratio_on_over_off"] = (
            s["on"]["output_tokens_per_s"] / s["off"]["output_tokens_per_s"]
        )
        s["first_wave_ttft_ratio_off_over_on"] = (
            s["off"]["first_wave_ttft_ms_median"] / s["on"]["first_wave_ttft_ms_median"]
        )
        print(f"\nshared_system ({CLIENTS} clients, {SYSTEM_TOKENS}-token system prompt)")
        print(f"{'cache':<6} {'TTFT p50 ms':>12} {'out tok/s':>10} {'wall s':>8} {'cached':>8}")
        for mode in ("on", "off"):
            r = s[mode]
            print(
                f"{mode:<6} {r['ttft_ms_median']:>12.0f} {r['output_tokens_per_s']:>10.1f} "
                f"{r['wall_s']:>8.1f} {r['cached_tokens']:>8.0f}"
            )
        print(
            f"TTFT {s['ttft_ratio_off_over_on']:.1f}x lower, throughput "
            f"{s['throughput_ratio_on_over_off']:.1f}x higher with the cache; a new "
            f"processor's first wave: TTFT {s['on']['first_wave_ttft_ms_median']:.0f} ms on, "
            f"{s['off']['first_wave_ttft_ms_median']:.0f} ms off "
            f"({s['first_wave_ttft_ratio_off_over_on']:.1f}x)"
        )
    if "chat_turns" in runs:
        summary["chat_turns"] = _medians(
            runs["chat_turns"],
            (
                "ttft_ms_median_by_turn",
                "cached_share_median_by_turn",
                "share_of_previous_turn_reused_median",
            ),
        )
        c = summary["chat_turns"]
        print(f"\nchat_turns ({CONVERSATIONS} conversations x {TURNS} turns)")
        print(
            f"{'turn':<5} {'TTFT on ms':>11} {'TTFT off ms':>12} {'cached share':>13} "
            f"{'of previous turn':>17}"
        )
        for t in range(TURNS):
            of_prev = c["on"]["share_of_previous_turn_reused_median"][t - 1] if t else None
            print(
                f"{t + 1:<5} {c['on']['ttft_ms_median_by_turn'][t]:>11.0f} "
                f"{c['off']['ttft_ms_median_by_turn'][t]:>12.0f} "
                f"{c['on']['cached_share_median_by_turn'][t]:>13.0%} "
                f"{'-' if of_prev is None else format(of_prev, '.0%'):>17}"
            )
    if "rotation" in runs:
        rotation_keys = (
            "system_tokens_hit_share_after_round_1",
            "wall_s",
            "pool_bytes",
            "pool_evictions",
            "rss_growth_bytes",
        )
        summary["rotation"] = _medians(runs["rotation"], rotation_keys)
        r = summary["rotation"]
        print("\nrotation (8 system prompts of ~500 tokens over 4 slots, 3 rounds)")
        print(
            f"{'cache':<6} {'hits after round 1':>19} {'wall s':>8} {'pool MiB':>9} {'RSS growth MiB':>15}"
        )
        for mode in ("on", "off"):
            print(
                f"{mode:<6} {r[mode]['system_tokens_hit_share_after_round_1']:>19.0%} "
                f"{r[mode]['wall_s']:>8.1f} {r[mode]['pool_bytes'] / 2**20:>9.1f} "
                f"{r[mode]['rss_growth_bytes'] / 2**20:>15.1f}"
            )
    if "no_sharing" in runs:
        on, off = runs["no_sharing"]["on"], runs["no_sharing"]["off"]
        ratios = [  # each round's on/off pair, run back to back
            a["output_tokens_per_s"] / b["output_tokens_per_s"]
            for a, b in zip(on, off, strict=True)
        ]
        summary["no_sharing"] = {
            "on_tokens_per_s": _median_of(on, "output_tokens_per_s"),
            "off_tokens_per_s": _median_of(off, "output_tokens_per_s"),
            "cached_tokens_on": _median_of(on, "cached_tokens"),
            "ratio_on_over_off_median": statistics.median(ratios),
            "ratios": ratios,
        }
        n = summary["no_sharing"]
        print(f"\nno_sharing ({CLIENTS} requests, nothing shared)")
        print(
            f"output tokens/s: on {n['on_tokens_per_s']:.1f}, off {n['off_tokens_per_s']:.1f}; "
            f"median on/off ratio {n['ratio_on_over_off_median']:.3f} (rounds: "
            + ", ".join(f"{r:.3f}" for r in ratios)
            + ")"
        )
    if "ideal_schedule" in runs:
        on, off = runs["ideal_schedule"]["on"], runs["ideal_schedule"]["off"]
        key = "median_request_first_token_s"
        summary["ideal_schedule"] = {
            "on_s": _median_of(on, key),
            "off_s": _median_of(off, key),
            "ratio_off_over_on": _median_of(off, key) / _median_of(on, key),
        }
        i = summary["ideal_schedule"]
        print("\nideal_schedule (shared_system's 16th request, model steps only, no decoding)")
        print(
            f"first token at best: on {i['on_s']:.2f} s, off {i['off_s']:.2f} s: "
            f"{i['ratio_off_over_on']:.1f}x"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "prefix_cache.json"
    # Scenarios not run this time keep their earlier results.
    out = json.loads(path.read_text()) if path.exists() else {"summary": {}, "runs": {}}
    out["machine"] = {"cpu": platform.processor() or platform.machine()}
    out["repeats"] = {**(out.get("repeats") or {}), **dict.fromkeys(runs, args.repeats)}
    out["summary"].update(summary)
    out["runs"].update(runs)
    path.write_text(json.dumps(out, indent=2) + "\n")
    _plot(out["summary"], args.out / "prefix_cache.png")


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("shared_system", "chat_turns") if name in summary]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        if name == "shared_system":
            s = summary[name]
            ax.bar(
                ["cache off", "cache on"], [s["off"]["ttft_ms_median"], s["on"]["ttft_ms_median"]]
            )
            ax.set_ylabel("median time to first token (ms)")
            ax.set_title(f"{CLIENTS} clients, shared {SYSTEM_TOKENS}-token system prompt")
        else:
            c = summary[name]
            turns = list(range(1, TURNS + 1))
            for mode in ("off", "on"):
                ax.plot(turns, c[mode]["ttft_ms_median_by_turn"], marker="o", label=f"cache {mode}")
            ax.set_xlabel("turn")
            ax.set_ylabel("median time to first token (ms)")
            ax.set_title(f"{CONVERSATIONS} conversations x {TURNS} turns")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
