"""``zigllama-batch serve``: the app under uvicorn, with a graceful shutdown.

On SIGTERM or SIGINT the server stops accepting connections, then drains the processor: requests
in flight finish, for at most ``drain_timeout`` seconds; whatever is left then ends with
:class:`~zigllama_batch.errors.ProcessorStopped`, which clients receive as a 503 or as a final
error event of their stream. Then uvicorn closes the connections and the server exits with
status 0. A second signal cuts the drain short.

The address is bound before the model loads (a port in use is reported at once, exit status 1),
and once the server listens, stderr says what it serves, where, and with which settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Generator, Sequence
from pathlib import Path

import uvicorn
import uvicorn.config
import uvicorn.logging

from ..batching.processor import BatchProcessor
from ..batching.types import BatchConfig
from ..engine.gguf_loader import LoadProgressCallback
from ..engine.hub import model_path
from ..generation import DEFAULT_ACTIVATIONS, Activations
from ..generator import load_model
from ..kv import KVStats
from .app import create_app

__all__ = ["API_KEY_ENV", "serve"]

API_KEY_ENV = "ZIGLLAMA_BATCH_API_KEY"
"""Environment variable read for the API key when ``--api-key`` is not given."""


class _Server(uvicorn.Server):
    """uvicorn that drains the processor before closing connections, and exits 0 after a
    signal (uvicorn re-raises the signal once shut down so the default handler runs, which
    would turn a clean drain into exit status 143 or 130)."""

    def __init__(
        self,
        config: uvicorn.Config,
        processor: BatchProcessor,
        drain_timeout: float,
        *,
        banner: str = "",
    ) -> None:
        super().__init__(config)
        self.processor = processor
        self.drain_timeout = drain_timeout
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Listening now; uvicorn logs no address for sockets it is given, the banner does.
        if self.started and self.banner:
            print(self.banner, file=sys.stderr, flush=True)

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
    activations: Activations = DEFAULT_ACTIVATIONS,
    draft_model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    cors_origins: Sequence[str] | None = None,
    drain_timeout: float = 30.0,
    log_level: str = "info",
    on_progress: LoadProgressCallback | None = None,
) -> int:
    """Bind the address, load the model and serve it until SIGTERM/SIGINT; returns the exit
    status (1 when the address cannot be bound).

    Progress and the settings go to stderr: the model file, then, once the server listens, the
    model id clients pass, the address and the batching settings. ``on_progress`` is told how
    loading the model goes (:func:`~zigllama_batch.load_model`'s). ``draft_model`` (a path or
    a name, like ``model``) drafts tokens for speculative decoding. ``activations``: as
    :func:`~zigllama_batch.load_model`'s (the draft model's too).

    Raises:
        ModelLoadError: the model (or the draft model) cannot be found, fetched or read.
        ValueError: the loaded model cannot take a setting of ``config`` (``max_context``), or
            the draft model does not share its vocabulary.
    """
    try:
        sock = _bind(host, port)
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"error: cannot listen on {_address(host, port)}: {reason}", file=sys.stderr)
        return 1
    try:
        path = model_path(model or None)
        print(f"loading {path}", file=sys.stderr, flush=True)
        llama, tokenizer = load_model(path, on_progress=on_progress, activations=activations)
        if config.max_context is None:  # memory is bounded by kv_cache_mb, not by slot sizes
            config = dataclasses.replace(config, max_context=llama.config.context_length)
        drafter = None
        if draft_model is not None:
            draft_path = model_path(draft_model)
            print(f"loading the draft model {draft_path}", file=sys.stderr, flush=True)
            drafter = load_model(draft_path, on_progress=on_progress, activations=activations)
        processor = BatchProcessor(llama, tokenizer, config, draft_model=drafter)
        name = model_name or processor.model_name
        api_key = api_key or os.environ.get(API_KEY_ENV) or None
        app = create_app(
            processor,
            model_name=name,
            api_key=api_key,
            manage_processor=True,
            drain_timeout=drain_timeout,
            cors_origins=cors_origins,
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
        banner = _banner(
            path,
            name,
            f"http://{_address(host, sock.getsockname()[1])}",
            config,
            activations=activations,
            draft=draft_model,
            context=processor.max_context,
            kv=processor.kv_stats(),
            api_key=api_key is not None,
            cors_origins=cors_origins,
            drain_timeout=drain_timeout,
        )
        server = _Server(uv_config, processor, drain_timeout, banner=banner)
        with _package_logging(log_level):
            server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


def _speculation(config: BatchConfig, draft: str | None) -> str:
    if not config.speculative_tokens:
        return "off (--speculative-tokens)"
    drafters = "prompt lookup" + (f", then the draft model {draft}" if draft else "")
    return (
        f"up to {config.speculative_tokens} drafted tokens a sequence ({drafters}), while at "
        f"most {config.speculative_max_batch} sequences decode"
    )


def _banner(
    path: Path,
    name: str,
    url: str,
    config: BatchConfig,
    *,
    activations: str = DEFAULT_ACTIVATIONS,
    draft: str | None = None,
    context: int,
    kv: KVStats,
    api_key: bool,
    cors_origins: Sequence[str] | None = None,
    drain_timeout: float,
) -> str:
    """What the server serves, where, and with which settings (the key itself is not shown)."""
    settings = [
        ("model file", str(path)),
        ("model id", f"{name}  (clients pass it as `model`)"),
        ("activations", activations),
        ("strategy", config.strategy.value),
        ("max batch size", str(config.max_batch_size)),
        ("queue size", str(config.max_queue_size)),
        ("speculation", _speculation(config, draft)),
        ("context", f"{context} tokens per sequence"),
        ("KV memory", _kv_budget(kv, context)),
        ("API key", "on" if api_key else "off (no authentication)"),
        ("CORS origins", ", ".join(cors_origins) if cors_origins else "none (--cors-origins)"),
        ("drain timeout", f"{drain_timeout:g} s"),
    ]
    lines = [f"  {key:<15} {value}" for key, value in settings]
    return "\n".join([f"serving {name} on {url} (Ctrl+C to stop)", *lines])


def _kv_budget(kv: KVStats, context: int) -> str:
    """The key/value budget, and what it holds in tokens."""
    pool = kv.budget_bytes - kv.budget_tokens * kv.bytes_per_token
    return (
        f"{kv.budget_bytes / 2**20:.0f} MiB: {kv.budget_tokens} tokens at once "
        f"({kv.budget_tokens / context:.1f} full contexts), a {pool / 2**20:.0f} MiB prefix "
        "pool included (--kv-cache-mb)"
    )


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (uvicorn serves on it).

    Binding before the model loads reports a port in use at once. Listening at once matters
    too: with SO_REUSEADDR, another process may bind the same port until this one listens, and
    the server would then fail only after the model loaded (with uvloop, silently). Connections
    that arrive while the model loads wait in the backlog.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except BaseException:
        sock.close()
        raise
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def _package_logging(log_level: str) -> Generator[None, None, None]:
    """While serving, zigllama_batch's own log records (a drain that timed out, a failed
    scheduler task) go to stderr formatted as uvicorn's, unless the host configured logging."""
    package = logging.getLogger("zigllama_batch")
    if package.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(uvicorn.logging.DefaultFormatter("%(levelprefix)s %(message)s"))
    previous = package.level
    package.addHandler(handler)
    package.setLevel(uvicorn.config.LOG_LEVELS[log_level.lower()])
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"
