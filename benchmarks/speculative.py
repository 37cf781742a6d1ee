"""Speculative decoding (prompt lookup, and a draft model when given) on and off: one stream on
grounded and open tasks, and 8 and 32 concurrent streams.

Tasks: repeating a passage, rewriting it with one word changed, answering from it by quoting,
renaming a function in a piece of code (grounded: the answer copies from the prompt), and
open chat questions. One stream: each task alone, greedy, ``--max-tokens`` tokens, with
``speculative_tokens=--k`` against 0, the two processors taking turns, round after round;
tokens/s = completion tokens / latency, medians over the rounds. Concurrent: 8 and 32
requests cycling through all tasks at once, tokens/s = all completion tokens / wall time.
Greedy output must be identical on and off (checked, reported). Also reported: drafted and
accepted tokens, accepted per verify step, steps per request.

    python benchmarks/speculative.py [--model smollm2-135m] [--rounds 3] [--k 8]
        [--draft-model smollm2-135m]

With ``--draft-model`` (a GGUF file or a packaged model's name, as ``--model``), "on" drafts
with that model where prompt lookup finds nothing (it must share the target's vocabulary).
Writes ``benchmarks/results/speculative-NAME.json`` and ``.png`` (``speculative-NAME-draft-
DRAFT`` with a draft model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, get_args

from zigllama_batch import (
    Activations,
    BatchConfig,
    BatchingStrategy,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    LLaMAModel,
    Tokenizer,
    load_model,
)
from zigllama_batch.generation import DEFAULT_ACTIVATIONS
from zigllama_batch.testing import cpu_name

PASSAGE = (
    "The Amazon rainforest covers much of the Amazon basin of South America. This basin "
    "encompasses seven million square kilometres, of which five and a half million square "
    "kilometres are covered by the rainforest. The region includes territory belonging to "
    "nine nations and 3,344 formally acknowledged indigenous territories. The majority of the "
    "forest, 60%, is in Brazil, followed by Peru with 13% and Colombia with 10%."
)
CODE = '''def compute_total(prices, tax_rate):
    """Return the total of prices with tax applied."""
    subtotal = 0.0
    for price in prices:
        if price < 0:
            raise ValueError("negative price")
        subtotal += price
    tax = subtotal * tax_rate
    return round(subtotal + tax, 2)


def main():
    prices = [9.99, 4.50, 12.00]
    print(compute_total(prices, 0.08))
'''
TASKS: dict[str, str] = {
    "repeat": f"Repeat this passage exactly:\n\n{PASSAGE}",
    "edit": (
        "Rewrite the passage below, changing only the word 'rainforest' to 'jungle'. Keep "
        f"everything else identical.\n\n{PASSAGE}"
    ),
    "answer": (
        f"{PASSAGE}\n\nUsing only the passage above, answer by quoting the sentences that say "
        "how large the basin is and which countries hold most of the forest."
    ),
    "code": (
        "Rename the function compute_total to sum_prices everywhere in this code and give "
        f"back the whole code:\n\n```python\n{CODE}```"
    ),
    "chat": "What are three good habits for staying healthy? Explain each briefly.",
}
GROUNDED = ("repeat", "edit", "answer", "code")
CONTINUOUS = BatchingStrategy.CONTINUOUS


def request(task: str, max_tokens: int) -> BatchRequest:
    config = GenerationConfig.greedy(max_tokens=max_tokens)
    return BatchRequest(prompt=[{"role": "user", "content": TASKS[task]}], config=config)


async def one_stream(p: BatchProcessor, task: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = await p.submit(request(task, max_tokens))
    seconds = time.perf_counter() - t0
    g = r.result
    decode_s = seconds - r.time_to_first_token_ms / 1000
    return {
        "tokens_per_s": g.completion_tokens / seconds,
        "decode_tokens_per_s": (g.completion_tokens - 1) / decode_s,
        "tokens": g.completion_tokens,
        "steps": r.timeline.steps,
        "drafted": g.draft_tokens,
        "accepted": g.accepted_draft_tokens,
        "text": g.text,
    }


async def concurrent(p: BatchProcessor, n: int, max_tokens: int) -> dict[str, Any]:
    tasks = list(TASKS)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(p.submit(request(tasks[i % len(tasks)], max_tokens)) for i in range(n))
    )
    seconds = time.perf_counter() - t0
    tokens = sum(r.result.completion_tokens for r in results)
    return {
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "drafted": sum(r.result.draft_tokens for r in results),
        "accepted": sum(r.result.accepted_draft_tokens for r in results),
        "texts": [r.result.text for r in results],
    }


async def measure(
    model: LLaMAModel,
    tokenizer: Tokenizer,
    draft: tuple[LLaMAModel, Tokenizer] | None,
    rounds: int,
    k: int,
    max_tokens: int,
    tasks: list[str],
    batches: list[int],
) -> dict[str, Any]:
    configs = {
        "off": BatchConfig(strategy=CONTINUOUS, max_batch_size=32, speculative_tokens=0),
        "on": BatchConfig(strategy=CONTINUOUS, max_batch_size=32, speculative_tokens=k),
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"off": {}, "on": {}}
    async with (
        BatchProcessor(model, tokenizer, configs["off"]) as off,
        BatchProcessor(model, tokenizer, configs["on"], draft_model=draft) as on,
    ):
        processors = {"off": off, "on": on}
        await off.submit(request("chat", 4))  # warm-up: compiled kernels loaded
        await on.submit(request("chat", 4))
        for r in range(rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            for task in tasks:
                for mode in order:
                    out = await one_stream(processors[mode], task, max_tokens)
                    runs[mode].setdefault(task, []).append(out)
            for n in batches:
                for mode in order:
                    out = await concurrent(processors[mode], n, max_tokens)
                    runs[mode].setdefault(f"batch{n}", []).append(out)
            print(f"round {r + 1}/{rounds} done", flush=True)
    rows = []
    for name in [*tasks, *(f"batch{n}" for n in batches)]:
        a, b = runs["off"][name], runs["on"][name]
        off_tps = statistics.median(x["tokens_per_s"] for x in a)
        on_tps = statistics.median(x["tokens_per_s"] for x in b)
        drafted = sum(x["drafted"] for x in b)
        accepted = sum(x["accepted"] for x in b)
        same = all(
            x.get("text", x.get("texts")) == y.get("text", y.get("texts"))
            for x, y in zip(a, b, strict=True)
        )
        row = {
            "workload": name,
            "off_tokens_per_s": off_tps,
            "on_tokens_per_s": on_tps,
            "speedup": on_tps / off_tps,
            "drafted": drafted,
            "accepted": accepted,
            "acceptance": accepted / drafted if drafted else 0.0,
            "identical_output": same,
        }
        if "decode_tokens_per_s" in b[0]:
            off_d = statistics.median(x["decode_tokens_per_s"] for x in a)
            on_d = statistics.median(x["decode_tokens_per_s"] for x in b)
            row.update(off_decode=off_d, on_decode=on_d, decode_speedup=on_d / off_d)
        if "steps" in b[0]:
            row["steps_off"] = a[0]["steps"]
            row["steps_on"] = b[0]["steps"]
            row["tokens"] = b[0]["tokens"]
        rows.append(row)
    return {"rows": rows}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["workload"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(names, [r["speedup"] for r in rows], color=["tab:green"] * 4 + ["tab:blue"] * 3)
    ax.axhline(1.0, color="gray", lw=1)
    for i, r in enumerate(rows):
        ax.text(i, r["speedup"], f"{r['speedup']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("tokens/s, on / off")
    drafter = "prompt lookup"
    if result.get("draft_model"):
        drafter += f", then {result['draft_model']}"
    ax.set_title(
        f"{result['model']}: speculative_tokens={result['k']} ({drafter}), "
        f"{result['machine']['cpu']}, 2 threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or packaged model name")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=8, help="speculative_tokens when on")
    ap.add_argument(
        "--draft-model",
        default=None,
        metavar="NAME_OR_PATH",
        help="draft with this model too when on (GGUF file or packaged model name)",
    )
    ap.add_argument(
        "--activations",
        choices=get_args(Activations),
        default=DEFAULT_ACTIVATIONS,
        help="what the quantized layers multiply (see load_model)",
    )
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--tasks", default=",".join(TASKS), help="one-stream tasks to run")
    ap.add_argument("--batches", default="8,32", help="concurrent streams to run")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    model, tokenizer = load_model(args.model, activations=args.activations)
    draft = (
        None
        if args.draft_model is None
        else load_model(args.draft_model, activations=args.activations)
    )
    tasks = [t for t in args.tasks.split(",") if t]
    batches = [int(n) for n in args.batches.split(",") if n]
    result = asyncio.run(
        measure(model, tokenizer, draft, args.rounds, args.k, args.max_tokens, tasks, batches)
    )
    result.update(
        model=model.config.name,
        draft_model=None if draft is None else draft[0].config.name,
        k=args.k,
        activations=args.activations,
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        machine={"cpu": cpu_name(), "python": platform.python_version()},
    )
    drafter = "" if draft is None else f", draft model {result['draft_model']}"
    print(
        f"\n{result['model']}, speculative_tokens={args.k}{drafter}, {args.activations} "
        f"activations, medians of {args.rounds} rounds"
    )
    print("tokens/s: completion tokens over latency; decode: after the first token")
    print(
        f"{'workload':<9} {'off t/s':>8} {'on t/s':>8} {'speedup':>8} {'decode off':>10} "
        f"{'on':>7} {'speedup':>8} {'accepted':>10} {'steps':>8} same"
    )
    for r in result["rows"]:
        acc = f"{r['accepted']}/{r['drafted']}"
        decode = (
            f"{r['off_decode']:10.1f} {r['on_decode']:7.1f} {r['decode_speedup']:7.2f}x"
            if "off_decode" in r
            else f"{'':10} {'':7} {'':8}"
        )
        steps = f"{r['steps_off']}/{r['steps_on']}" if "steps_on" in r else ""
        print(
            f"{r['workload']:<9} {r['off_tokens_per_s']:8.1f} {r['on_tokens_per_s']:8.1f} "
            f"{r['speedup']:7.2f}x {decode} {acc:>10} {steps:>8} "
            f"{'yes' if r['identical_output'] else 'NO'}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"speculative-{result['model']}"
    if args.activations != "float32":
        stem += f"-{args.activations}"
    if draft is not None:
        stem += f"-draft-{result['draft_model']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
