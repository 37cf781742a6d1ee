"""The OpenAI-compatible HTTP server (optional extra: ``pip install -e '.[server]'`` from the
repository).

``create_app(processor)`` builds a Starlette app to mount in an existing asyncio service;
``zigllama-batch serve`` runs it with uvicorn (see :mod:`zigllama_batch.server.run`).
"""

from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .metrics import ProcessorMetrics

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ProcessorMetrics", "create_app"]
