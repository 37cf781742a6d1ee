"""Speculative decoding over HTTP, this server against llama.cpp's, one stream, same file and
prompts.

The tasks of ``benchmarks/speculative.py`` (grounded: repeat, edit, answer, code; open: chat)
go one at a time as greedy streamed chat completions to four servers in turn, each alone on
the machine: ``zigllama-batch serve`` without and with ``--speculative-tokens K``, and
``llama-server`` with its defaults (no speculation) and with its prompt lookup
(``--spec-type ngram-simple --spec-draft-n-max K``). The servers take turns round after round;
tokens/s = streamed tokens over the request's wall time, medians over the rounds. Both
servers use 2 threads and one slot / sequence. Outputs are compared between the two settings
of each server (identical is expected: speculation does not change greedy text) and across
servers (they may differ by a token where two logits tie within rounding).

    python benchmarks/speculative_vs_llama_cpp.py --llama-server PATH/llama-server \\
        [--model FILE.gguf] [--k 6] [--rounds 3] [--max-tokens 160]

Build llama-server from the llama.cpp vendored in llama-cpp-python 0.3.36's source package
(docs/benchmarks.md). Writes ``benchmarks/results/speculative_vs_llama_cpp-NAME.json`` and
``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from zigllama_batch.engine.hub import model_path
from zigllama_batch.testing import ServerProcess, cpu_name

sys.path.insert(0, str(Path(__file__).parent))
from speculative import TASKS
from vs_llama_cpp import LlamaServer


async def one_stream(base_url: str, model: str, task: str, max_tokens: int) -> dict[str, Any]:
    """One greedy streamed chat completion of ``task``: tokens/s and its text."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": TASKS[task]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pieces: list[str] = []
    tokens = 0
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if text := (choice.get("delta") or {}).get("content"):
                        pieces.append(text)
        seconds = time.perf_counter() - started
    # Tokens as the server counts them (its usage): a speculating server may send several
    # tokens in one delta.
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "text": "".join(pieces)}


async def run_server(
    name: str, start: Callable[[], Any], tasks: list[str], max_tokens: int
) -> dict[str, dict[str, Any]]:
    """Start a server, warm it up, run every task once, stop it."""
    out: dict[str, dict[str, Any]] = {}
    async with start() as server:
        base_url, model = server.base_url, getattr(server, "model", "default")
        await one_stream(base_url, model, "chat", 4)  # warm-up
        for task in tasks:
            out[task] = await one_stream(base_url, model, task, max_tokens)
    print(f"  {name}: " + ", ".join(f"{t} {r['tokens_per_s']:.1f}" for t, r in out.items()))
    return out


class _Ours:
    """ServerProcess as an async context manager."""

    def __init__(self, *flags: str) -> None:
        self.server = ServerProcess(*flags)

    async def __aenter__(self) -> ServerProcess:
        return await asyncio.to_thread(self.server.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.server.stop)


async def measure(args: argparse.Namespace, tasks: list[str], path: Path) -> dict[str, Any]:
    k = str(args.k)
    one_slot = ["-np", "1", "-c", "4096", "-t", "2", "-tb", "2"]  # 2 threads, one sequence
    servers: dict[str, Callable[[], Any]] = {
        "ours, off": lambda: _Ours("--model", str(path), "--max-batch-size", "1"),
        "ours, speculative": lambda: _Ours(
            "--model", str(path), "--max-batch-size", "1", "--speculative-tokens", k
        ),
        "llama.cpp, default": lambda: LlamaServer(args.llama_server, path, one_slot),
        "llama.cpp, ngram-simple": lambda: LlamaServer(
            args.llama_server,
            path,
            [*one_slot, "--spec-type", "ngram-simple", "--spec-draft-n-max", k],
        ),
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in servers}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        names = list(servers) if r % 2 == 0 else list(reversed(servers))
        for name in names:
            result = await run_server(name, servers[name], tasks, args.max_tokens)
            for task, outcome in result.items():
                runs[name].setdefault(task, []).append(outcome)
    table = []
    for task in tasks:
        row: dict[str, Any] = {"task": task}
        for name in servers:
            row[name] = statistics.median(x["tokens_per_s"] for x in runs[name][task])
        texts = {name: runs[name][task][0]["text"] for name in servers}
        row["ours_identical_on_off"] = texts["ours, off"] == texts["ours, speculative"]
        row["llama_identical_on_off"] = (
            texts["llama.cpp, default"] == texts["llama.cpp, ngram-simple"]
        )
        row["same_text_as_llama"] = texts["ours, off"] == texts["llama.cpp, default"]
        table.append(row)
    return {"servers": list(servers), "rows": table, "runs": runs}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, servers = result["rows"], result["servers"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(servers)
    colors = ["tab:gray", "tab:green", "tab:orange", "tab:red"]
    for i, name in enumerate(servers):
        xs = [j + (i - 1.5) * width for j in range(len(rows))]
        ax.bar(xs, [r[name] for r in rows], width, label=name, color=colors[i % len(colors)])
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows])
    ax.set_ylabel("tokens/s, one stream")
    ax.set_title(
        f"{result['model']}: speculative decoding over HTTP, k={result['k']}, "
        f"{result['machine']['cpu']}, 2 threads"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", type=Path, required=True)
    ap.add_argument("--model", default=None, help="GGUF file or packaged model name")
    ap.add_argument("--k", type=int, default=6, help="most drafted tokens a step, both servers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    path = Path(model_path(args.model, progress=False))
    result = asyncio.run(measure(args, tasks, path))
    name = path.stem
    result.update(
        model=name,
        k=args.k,
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        machine={"cpu": cpu_name(), "python": platform.python_version()},
    )
    servers = result["servers"]
    print(f"\n{name}, one stream, tokens/s, medians of {args.rounds} rounds, k={args.k}")
    print(f"{'task':<8} " + " ".join(f"{s:>24}" for s in servers) + "  ours/llama (spec)")
    for r in result["rows"]:
        ratio = r["ours, speculative"] / r["llama.cpp, ngram-simple"]
        print(f"{r['task']:<8} " + " ".join(f"{r[s]:>24.1f}" for s in servers) + f"  {ratio:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"speculative_vs_llama_cpp-{name}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .png")


if __name__ == "__main__":
    main()
