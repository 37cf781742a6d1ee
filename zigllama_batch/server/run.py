"""``zigllama-batch serve``: the app under uvicorn, with a graceful shutdown.

On SIGTERM or SIGINT the server stops accepting connections, then drains the processor: requests
in flight finish, for at most ``drain_timeout`` seconds; whatever is left then ends with
:class:`~zigllama_batch.errors.ProcessorStopped`, which clients receive as a 503 or as a final
error event of their stream. Then uvicorn closes the connections and the server exits with
status 0. A second signal cuts the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Generator
from pathlib import Path

import uvicorn

from ..batching.processor import BatchProcessor
from ..batching.types import BatchConfig
from ..engine.hub import default_model_path
from ..generator import load_model
from .app import create_app

__all__ = ["API_KEY_ENV", "serve"]

API_KEY_ENV = "ZIGLLAMA_BATCH_API_KEY"
"""Environment variable read for the API key when ``--api-key`` is not given."""

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn that drains the processor before closing connections, and exits 0 after a
    signal (uvicorn re-raises the signal once shut down so the default handler runs, which
    would turn a clean drain into exit status 143 or 130)."""

    def __init__(
        self, config: uvicorn.Config, processor: BatchProcessor, drain_timeout: float
    ) -> None:
        super().__init__(config)
        self.processor = processor
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting first
            server.close()
        closing = asyncio.ensure_future(
            self.processor.aclose(drain=True, drain_timeout=self.drain_timeout)
        )
        while not closing.done():
            await asyncio.wait([closing], timeout=0.1)
            if self.force_exit and not closing.done():  # a second signal: stop now
                await self.processor.aclose(drain=False)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(
    *,
    model: str | None,
    config: BatchConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    drain_timeout: float = 30.0,
    log_level: str = "info",
) -> int:
    """Load the model and serve it until SIGTERM/SIGINT; returns the exit status."""
    path = Path(model) if model else default_model_path()
    llama, tokenizer = load_model(path)
    processor = BatchProcessor(llama, tokenizer, config)
    name = model_name or processor.model_name
    app = create_app(
        processor,
        model_name=name,
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        manage_processor=True,
        drain_timeout=drain_timeout,
    )
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=_loop_name(),
        lifespan="on",
        # The processor has drained by the time uvicorn waits for connections: this only
        # bounds the last bytes of responses already complete.
        timeout_graceful_shutdown=5,
        log_level=log_level,
    )
    server = _Server(uv_config, processor, drain_timeout)
    logger.info("serving %s as %r on http://%s:%d", path, name, host, port)
    server.run()
    return 0 if server.started else 1


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
