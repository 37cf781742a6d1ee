"""The HTTP server under N concurrent streaming clients, against the same load in-process.

Starts ``zigllama-batch serve`` (CONTINUOUS, max batch size 32, default model) on a free
loopback port. Each of N clients sends streamed chat completions back to back (64 output
tokens each, ``ignore_eos``), for N = 1, 8 and 32. Reported: requests/s, output tokens/s, p50/p99
latency and time to first token, measured by the clients. At N = 32 the same closed-loop load
also runs in-process (``processor.stream``), interleaved with the HTTP runs, and the HTTP/in-
process throughput ratio (median over rounds) is the server's overhead.

    python benchmarks/server.py [--requests-per-client 3] [--rounds 2] [--out benchmarks/results]

The load generator is plain httpx with a minimal SSE reader, so the clients take as little of
the 2 cores as possible. Writes ``server.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
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
    load_model,
)
from zigllama_batch.testing import ServerProcess, chat_stream_load, load_summary

OUTPUT_TOKENS = 64
TOPICS = [
    "the sea",
    "a lighthouse",
    "bees",
    "a robot",
    "autumn",
    "the moon",
    "a library",
    "trains",
    "mountains",
    "coffee",
    "a garden",
    "winter",
]


def prompt(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]}."


async def inprocess_load(
    processor: BatchProcessor, clients: int, per_client: int
) -> dict[str, Any]:
    """The same closed loop, through processor.stream in this process."""
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for j in range(per_client):
            request = BatchRequest(
                prompt=[{"role": "user", "content": prompt(c + j)}],
                config=GenerationConfig(
                    max_tokens=OUTPUT_TOKENS, temperature=1.0, top_k=0, top_p=1.0, ignore_eos=True
                ),
            )
            start = time.perf_counter()
            first = None
            stream = processor.stream(request)
            async for chunk in stream:
                if first is None and chunk.text:
                    first = time.perf_counter()
            end = time.perf_counter()
            assert stream.result is not None
            tokens += stream.result.result.completion_tokens
            latencies.append(end - start)
            ttfts.append((first or end) - start)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return load_summary("in_process", clients, tokens, elapsed, latencies, ttfts)


def show(row: dict[str, Any]) -> None:
    print(
        f"{row['kind']:>10} N={row['clients']:<3} {row['requests_per_s']:6.2f} req/s "
        f"{row['output_tokens_per_s']:7.1f} tok/s  latency p50/p99 {row['latency_p50_ms']:6.0f}/"
        f"{row['latency_p99_ms']:6.0f} ms  TTFT p50/p99 {row['ttft_p50_ms']:5.0f}/"
        f"{row['ttft_p99_ms']:5.0f} ms",
        flush=True,
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument(
        "--rounds", type=int, default=2, help="interleaved HTTP/in-process rounds at N=32"
    )
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    server = ServerProcess(
        "--max-batch-size", str(args.max_batch_size), capture_output=False
    ).start()
    base, model = server.base_url, server.model
    rows: list[dict[str, Any]] = []
    try:
        for n in (1, 8):
            row = await chat_stream_load(
                base, model, n, args.requests_per_client, OUTPUT_TOKENS, prompt
            )
            rows.append(row)
            show(row)
        llama, tokenizer = load_model()
        config = BatchConfig(
            strategy=BatchingStrategy.CONTINUOUS, max_batch_size=args.max_batch_size
        )
        ratios = []
        async with BatchProcessor(llama, tokenizer, config) as processor:
            for _ in range(args.rounds):
                inproc = await inprocess_load(processor, 32, args.requests_per_client)
                show(inproc)
                over_http = await chat_stream_load(
                    base, model, 32, args.requests_per_client, OUTPUT_TOKENS, prompt
                )
                show(over_http)
                rows += [inproc, over_http]
                ratios.append(over_http["output_tokens_per_s"] / inproc["output_tokens_per_s"])
    finally:
        server.stop()
    ratio = statistics.median(ratios)
    http32 = statistics.median(
        r["output_tokens_per_s"] for r in rows if r["kind"] == "http" and r["clients"] == 32
    )
    print(
        f"\nN=32: HTTP delivers {ratio:.0%} of the in-process output tokens/s "
        f"(median of {len(ratios)} interleaved rounds); HTTP median {http32:.0f} tokens/s"
    )
    write(Path(args.out), rows, ratio, http32, args.max_batch_size)


def write(out: Path, rows: list[dict[str, Any]], ratio: float, http32: float, batch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.json").write_text(
        json.dumps(
            {
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                },
                "output_tokens_per_request": OUTPUT_TOKENS,
                "max_batch_size": batch,
                "runs": rows,
                "http_over_in_process_at_32": ratio,
                "http_tokens_per_s_at_32": http32,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out / 'server.json'}")


if __name__ == "__main__":
    asyncio.run(main())
