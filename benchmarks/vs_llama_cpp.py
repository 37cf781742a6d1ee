"""Repeated shared prompts, this server against llama.cpp's, side by side on one machine.

Both serve the default model's GGUF over the OpenAI API on loopback, one after the other (never
at once: they would share the cores). 32 streamed completions share a ~640-token prefix, each
with its own ~20-token ending, 32 greedy output tokens (EOS ignored); the same 32 are sent a
second time. Reported per wave: median time to first token and output tokens per second.
llama.cpp runs with 32 slots (``-np 32``, 1,024 positions each), 2 threads and its prompt cache
(``cache_prompt``, on by default).

    python benchmarks/vs_llama_cpp.py --llama-server PATH/TO/llama-server

Build llama-server from the llama.cpp vendored in the ``llama-cpp-python`` sdist (CMake,
``-DGGML_NATIVE=ON -DLLAMA_CURL=OFF``, target ``llama-server``). Writes ``vs_llama_cpp.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import time
from pathlib import Path

import httpx

from zigllama_batch import load_model
from zigllama_batch.engine.hub import default_model_path
from zigllama_batch.testing import ServerProcess

CLIENTS = 32
PREFIX_TOKENS = 640
OUTPUT_TOKENS = 32


def prompts() -> list[str]:
    _, tokenizer = load_model()
    sentence = (
        "The archive keeps letters, maps and ledgers from the harbour town; each entry names "
        "the ship, its cargo, the captain and the weather on the day it sailed. "
    )
    ids = tokenizer.encode(sentence * 60)[:PREFIX_TOKENS]
    prefix = tokenizer.decode(ids)
    return [
        f"{prefix} Entry {i}: the ship that sailed on day {i * 3} carried" for i in range(CLIENTS)
    ]


async def wave(base_url: str, model: str, texts: list[str]) -> dict[str, float]:
    async def one(client: httpx.AsyncClient, text: str) -> tuple[float, int]:
        body = {
            "model": model,
            "prompt": text,
            "max_tokens": OUTPUT_TOKENS,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        started = time.perf_counter()
        first = None
        tokens = 0
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter() - started
        return (first if first is not None else float("nan")), tokens

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client, t) for t in texts))
        wall = time.perf_counter() - started
    return {
        "ttft_s_median": statistics.median(r[0] for r in results),
        "output_tokens_per_s": sum(r[1] for r in results) / wall,
        "wall_s": wall,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def run_ours(texts: list[str]) -> list[dict[str, float]]:
    server = ServerProcess("--max-batch-size", str(CLIENTS)).start()
    try:
        return [await wave(server.base_url, server.model, texts) for _ in range(2)]
    finally:
        server.stop()


class LlamaServer:
    """``llama-server`` serving ``model`` on a free loopback port with ``args`` (slots,
    context, threads, ...), as an async context manager that waits until it is healthy."""

    def __init__(self, binary: Path, model: Path, args: list[str]) -> None:
        self.base_url = f"http://127.0.0.1:{_free_port()}"
        port = self.base_url.rsplit(":", 1)[1]
        self.command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", port, *args]
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> LlamaServer:
        self.process = await asyncio.create_subprocess_exec(
            *self.command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(600):
                try:
                    if (await client.get(f"{self.base_url}/health")).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        await self.__aexit__()
        raise RuntimeError(f"llama-server did not become healthy: {self.command}")

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        await asyncio.wait_for(self.process.wait(), timeout=30)


async def run_llama(binary: Path, texts: list[str]) -> list[dict[str, float]]:
    args = ["-np", str(CLIENTS), "-c", str(CLIENTS * 1024), "-t", "2"]
    async with LlamaServer(binary, default_model_path(), args) as server:
        return [await wave(server.base_url, "default", texts) for _ in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    texts = prompts()
    results = {
        "zigllama_batch (prefix cache on)": asyncio.run(run_ours(texts)),
        "llama.cpp server (cache_prompt)": asyncio.run(run_llama(args.llama_server, texts)),
    }
    print(f"{CLIENTS} streamed completions sharing a ~{PREFIX_TOKENS}-token prefix, sent twice")
    print(f"{'server':<34} {'wave':>4} {'TTFT p50 s':>11} {'out tok/s':>10}")
    for name, waves in results.items():
        for i, w in enumerate(waves, 1):
            print(
                f"{name:<34} {i:>4} {w['ttft_s_median']:>11.1f} {w['output_tokens_per_s']:>10.1f}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"machine": {"cpu": platform.processor() or platform.machine()}, "results": results}
    (args.out / "vs_llama_cpp.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
