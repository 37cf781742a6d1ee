"""How long hostile request bodies stall the server's event loop.

The app runs in-process (httpx's ASGI transport) over the default model's processor, with a
probe that sleeps 1 ms at a time and records how late the loop wakes it. Each case sends
``--concurrent`` copies of one body at once (each just under the 1 MiB body limit) and reports
the worst wake-up lag and how long the answers took; every hostile body must get a 4xx. A
normal chat request is the baseline.

    python benchmarks/abuse.py [--repeats 3] [--concurrent 4] [--out benchmarks/results]

Writes ``abuse.json`` into ``--out``. Run it on a checkout before a fix (``PYTHONPATH=that
checkout``) to get the before figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from zigllama_batch import BatchConfig, BatchingStrategy, BatchProcessor, load_model
from zigllama_batch.server import create_app
from zigllama_batch.testing import LoopLagProbe

MODEL = "bench"


def _chat(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages, "max_tokens": 1}


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "one_normal_chat": lambda: _chat([{"role": "user", "content": "Hi"}]),
    "34k_empty_messages": lambda: _chat([{"role": "user", "content": ""}] * 34_000),
    "1MiB_one_message": lambda: _chat([{"role": "user", "content": "a " * 500_000}]),
    "1MiB_prompt_text": lambda: {"model": MODEL, "prompt": "word " * 200_000, "max_tokens": 1},
    "250k_token_ids": lambda: {"model": MODEL, "prompt": [11] * 250_000, "max_tokens": 1},
}


async def run_case(client: httpx.AsyncClient, body: dict[str, Any], n: int) -> dict[str, Any]:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json"}
    async with LoopLagProbe() as probe:
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(client.post(path, content=raw, headers=headers) for _ in range(n))
        )
        elapsed = time.perf_counter() - started
    return {
        "statuses": sorted({r.status_code for r in responses}),
        "max_loop_lag_ms": 1000 * max(probe.lags_s, default=0.0),
        "elapsed_ms": 1000 * elapsed,
        "body_bytes": len(raw),
    }


async def main_async(repeats: int, concurrent: int) -> dict[str, Any]:
    model, tokenizer = load_model()
    processor = BatchProcessor(model, tokenizer, BatchConfig(strategy=BatchingStrategy.CONTINUOUS))
    app = create_app(processor, model_name=MODEL, max_body_bytes=1 << 20)
    await processor.start()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in CASES}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=60) as c:
        await run_case(c, CASES["one_normal_chat"](), 1)  # warm-up: template, caches
        for _ in range(repeats):
            for name, make in CASES.items():  # interleaved: every case once per round
                rows[name].append(await run_case(c, make(), concurrent))
    await processor.aclose()
    return {
        name: {
            "statuses": sorted({s for r in runs for s in r["statuses"]}),
            "body_bytes": runs[0]["body_bytes"],
            "median_max_loop_lag_ms": statistics.median(r["max_loop_lag_ms"] for r in runs),
            "median_elapsed_ms": statistics.median(r["elapsed_ms"] for r in runs),
        }
        for name, runs in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = asyncio.run(main_async(args.repeats, args.concurrent))
    print(f"{args.concurrent} bodies at once, median of {args.repeats} rounds")
    print(f"{'case':<20} {'status':>10} {'body KiB':>9} {'max loop lag ms':>16} {'elapsed ms':>11}")
    for name, r in results.items():
        statuses = ",".join(map(str, r["statuses"]))
        print(
            f"{name:<20} {statuses:>10} {r['body_bytes'] / 1024:>9.0f} "
            f"{r['median_max_loop_lag_ms']:>16.1f} {r['median_elapsed_ms']:>11.1f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpu": platform.processor() or platform.machine()},
        "concurrent": args.concurrent,
        "repeats": args.repeats,
        "cases": results,
    }
    (args.out / "abuse.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
