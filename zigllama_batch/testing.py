"""Helpers for testing and measuring code that embeds or serves zigllama_batch.

Inside: :class:`ServerProcess` (``zigllama-batch serve`` in a subprocess on a free loopback
port: it waits until ``/health`` answers, reads the served model's id, and stops the server
with SIGTERM, returning its exit status) and :class:`LoopLagProbe` (how late the event loop
wakes a task that sleeps a millisecond: what a host application's other tasks feel while the
processor works), a closed-loop streaming load for an OpenAI-compatible server
(:func:`chat_stream_load`), and :func:`cpu_name` for benchmark reports. The project's own end-to-end tests and benchmarks use them; nothing
else in the package imports this module.
"""

from __future__ import annotations

import asyncio
import json
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import numpy as np

__all__ = ["LoopLagProbe", "ServerProcess", "chat_stream_load", "cpu_name", "load_summary"]


class ServerProcess:
    """``zigllama-batch serve`` in a subprocess, bound to a free port on 127.0.0.1.

    Use as ``with ServerProcess("--max-batch-size", "16") as server:`` (or :meth:`start` and
    :meth:`stop`); ``server.base_url`` and ``server.model`` are set once it is healthy, and
    ``server.output`` once it has stopped.
    """

    def __init__(
        self,
        *args: str,
        api_key: str | None = None,
        log_level: str = "warning",
        capture_output: bool = True,
        startup_timeout_s: float = 120.0,
    ) -> None:
        """Args:
        args: more ``zigllama-batch serve`` flags.
        api_key: passed as ``--api-key`` and sent when reading ``/v1/models``.
        log_level: the server's ``--log-level``.
        capture_output: collect the server's stdout and stderr (shown if it fails to start)
            instead of letting them through to the terminal.
        startup_timeout_s: how long the model may take to load before the start fails.
        """
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self._command = [
            sys.executable,
            "-m",
            "zigllama_batch.cli",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            log_level,
            *(["--api-key", api_key] if api_key else []),
            *args,
        ]
        self._capture = capture_output
        self._startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[str] | None = None
        self.model = ""
        """The id the server serves (from ``/v1/models``), once started."""
        self.output = ""
        """What the server printed (stdout and stderr), once stopped, when captured."""

    def start(self) -> Self:
        """Start the server and wait until it is healthy.

        Raises:
            RuntimeError: it exited early or was not healthy within the startup timeout (the
                message carries its output when captured).
        """
        out = subprocess.PIPE if self._capture else None
        self.process = subprocess.Popen(
            self._command,
            stdout=out,
            stderr=subprocess.STDOUT if self._capture else None,
            text=True,
        )
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self._output()}")
            try:
                if self._get("/health")[0] == 200:
                    models = json.loads(self._get("/v1/models")[1])
                    self.model = str(models["data"][0]["id"])
                    return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop(timeout_s=5)
        raise RuntimeError(f"the server was not healthy in {self._startup_timeout_s:.0f} s")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (a graceful drain), wait for the exit, kill if it takes longer than
        ``timeout_s``; returns the exit status. Safe to call more than once."""
        process = self.process
        if process is None:
            return 0
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            return process.wait(timeout=timeout_s)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout is not None and not process.stdout.closed:
                self.output = process.stdout.read()
                process.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _get(self, path: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        request = urllib.request.Request(self.base_url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), bytes(response.read())

    def _output(self) -> str:
        if self.process is None or self.process.stdout is None:
            return "(output not captured)"
        return self.process.stdout.read()

    def __repr__(self) -> str:
        running = self.process is not None and self.process.poll() is None
        return f"<ServerProcess {self.base_url} {'running' if running else 'stopped'}>"


class LoopLagProbe:
    """Records how late the running event loop wakes a task sleeping ``interval_s``.

    ``async with LoopLagProbe() as probe:`` runs the probe for the block; ``probe.lags_s``
    then holds one lag (seconds past the requested wake-up) per sleep.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        """Args:
        interval_s: how long each probe sleeps.
        """
        self.interval_s = interval_s
        self.lags_s: list[float] = []
        """Wake-up lags, in the order measured."""
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.lags_s.append(time.perf_counter() - started - self.interval_s)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def chat_stream_load(
    base: str,
    model: str,
    clients: int,
    per_client: int,
    max_tokens: int,
    prompt: Callable[[int], str],
    *,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Closed loop over HTTP: each of ``clients`` clients sends ``per_client`` streamed chat
    completions one after another (``max_tokens`` each, ``ignore_eos``; client ``c``'s
    ``j``-th message is ``prompt(c + j)``). Returns :func:`load_summary`'s figures, measured
    by the clients. Plain httpx with a minimal SSE reader, so the clients take little CPU."""
    import httpx  # a test dependency, imported only by this load generator

    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(
        base_url=base, timeout=600, limits=limits, headers=headers
    ) as http:

        async def client(c: int) -> None:
            nonlocal tokens
            for j in range(per_client):
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt(c + j)}],
                    "max_tokens": max_tokens,
                    "stream": True,
                    "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                }
                start = time.perf_counter()
                first = None
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(f"the stream ended with an error: {event}")
                        if (
                            first is None
                            and event["choices"]
                            and event["choices"][0]["delta"].get("content")
                        ):
                            first = time.perf_counter()
                        if event.get("usage"):
                            tokens += event["usage"]["completion_tokens"]
                end = time.perf_counter()
                latencies.append(end - start)
                ttfts.append((first or end) - start)

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    return load_summary("http", clients, tokens, elapsed, latencies, ttfts)


def load_summary(
    kind: str,
    clients: int,
    tokens: int,
    elapsed: float,
    latencies: list[float],
    ttfts: list[float],
) -> dict[str, Any]:
    """A load run's figures: requests and output tokens per second, latency and time to first
    token percentiles (p50, p99, in ms); one latency per request."""
    n = len(latencies)
    return {
        "kind": kind,
        "clients": clients,
        "requests": n,
        "output_tokens": tokens,
        "elapsed_s": elapsed,
        "requests_per_s": n / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "latency_p50_ms": float(np.percentile(latencies, 50) * 1000),
        "latency_p99_ms": float(np.percentile(latencies, 99) * 1000),
        "ttft_p50_ms": float(np.percentile(ttfts, 50) * 1000),
        "ttft_p99_ms": float(np.percentile(ttfts, 99) * 1000),
    }


def cpu_name() -> str:
    """lscpu's model name (the CPU changes between sessions of this project's machine)."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")]
    return names[0] if names else platform.processor()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
