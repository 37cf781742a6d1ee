"""``zigllama-batch serve``: the app under uvicorn, with a graceful shutdown.

On SIGTERM or SIGINT uvicorn stops accepting connections and waits (up to ``drain_timeout``)
for requests in flight; the app's lifespan then drains the processor. A server that shut down
this way exits with status 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
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
    """uvicorn, minus re-raising the shutdown signal afterwards: uvicorn does that so the default
    handler runs, which turns a clean drain into exit status 143 (SIGTERM) or 130 (SIGINT)."""

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
    name = model_name or path.name.removesuffix(".gguf")
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
        timeout_graceful_shutdown=max(1, round(drain_timeout)),
        log_level=log_level,
    )
    server = _Server(uv_config)
    logger.info("serving %s as %r on http://%s:%d", path, name, host, port)
    server.run()
    return 0 if server.started else 1


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
