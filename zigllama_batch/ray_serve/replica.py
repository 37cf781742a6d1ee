"""ModelReplica: the Ray Serve deployment that owns one BatchProcessor.

Each replica loads the model, limits its BLAS and kernel threads to the CPUs Ray gave it (so
replicas on one node do not oversubscribe the cores), and starts a :class:`~zigllama_batch.BatchProcessor` on
the replica's own event loop. The ingress calls :meth:`ModelReplica.submit` and
:meth:`ModelReplica.stream` with tokenized :class:`~zigllama_batch.BatchRequest` objects; a
call Serve cancels (the client went away) cancels the request in the processor. When Serve
stops the replica (scale-down, redeploy, shutdown) the processor drains for at most
``drain_timeout`` seconds. The health check fails once the processor is not running, and Serve
then replaces the replica.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from threadpoolctl import threadpool_limits

from ..batching.lifecycle import ProcessorState
from ..batching.processor import BatchProcessor
from ..batching.types import BatchConfig, BatchRequest, BatchResult, StreamChunk
from ..engine.gguf_loader import read_gguf_metadata
from ..engine.hub import model_path
from ..engine.kernels import set_threads as set_kernel_threads
from ..generation import Activations
from ..generator import load_model
from ..structured import StructuredOutput
from .metrics import RayMetrics
from .remote import ModelInfo

__all__ = ["ModelReplica", "ReplicaSettings"]

logger = logging.getLogger(__name__)

_GAUGE_PERIOD_S = 0.5
"""How often a replica sets its gauges (queue depth, running sequences, prefix pool)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSettings:
    """How each model replica runs."""

    model: str | None  # a GGUF path or a packaged model's name; None: the default model
    activations: Activations  # what the quantized layers multiply (see load_model)
    config: BatchConfig
    threads: int  # BLAS threads: the CPUs Ray reserves for the replica
    drain_timeout: float  # seconds a stopping replica lets running requests finish


class ModelReplica:
    """One model and its BatchProcessor, as a Serve deployment's replica."""

    async def __init__(self, settings: ReplicaSettings) -> None:  # type: ignore[misc]
        # Serve awaits an async constructor on the replica's event loop: the processor's
        # tasks then live on the loop that serves its requests.
        self.settings = settings
        self._blas = threadpool_limits(limits=settings.threads, user_api="blas")
        set_kernel_threads(settings.threads)  # numba's kernels too (after BLAS: see its doc)
        self.path = str(await asyncio.to_thread(model_path, settings.model, progress=False))
        model, tokenizer = await asyncio.to_thread(
            functools.partial(load_model, activations=settings.activations),
            self.path,
            progress=False,
        )
        self.processor = BatchProcessor(model, tokenizer, settings.config)
        self.metrics = RayMetrics(self.processor)
        self.processor.stats_recorder.observers.append(self.metrics)
        await self.processor.start()
        self._gauges = asyncio.create_task(self._update_gauges())
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        logger.info("replica %s serves %s (%s)", self.replica, self.path, self.processor)

    async def describe(self) -> ModelInfo:
        """What this replica serves."""
        return ModelInfo(
            model_name=self.processor.model_name,
            max_context=self.processor.max_context,
        )

    async def tokenizer_metadata(self) -> dict[str, Any]:
        """The GGUF metadata the model's tokenizer is built from (for an ingress on any node)."""
        return await asyncio.to_thread(read_gguf_metadata, self.path)

    async def submit(self, request: BatchRequest) -> BatchResult:
        """Run a request and return its result."""
        return await self.processor.submit(request)

    async def stream(self, request: BatchRequest) -> AsyncIterator[StreamChunk | BatchResult]:
        """Run a request: its chunks as they come, then its result."""
        async with self.processor.stream(request) as stream:  # closing cancels the request
            async for chunk in stream:
                yield chunk
            assert stream.result is not None
            yield stream.result

    async def check_structured(self, structured: StructuredOutput) -> None:
        """Compile an output constraint (raises InvalidRequest if it does not compile)."""
        await self.processor.check_structured(structured)

    async def check_health(self) -> None:
        """Serve's health check: the processor must be running."""
        state = self.processor.state
        if state is not ProcessorState.RUNNING:
            raise RuntimeError(f"the processor is {state.value}: {self.processor.failure!r}")

    async def _update_gauges(self) -> None:
        while True:
            self.metrics.update_gauges()
            await asyncio.sleep(_GAUGE_PERIOD_S)

    async def __del__(self) -> None:
        """Drain: Serve awaits this when it stops the replica."""
        processor = getattr(self, "processor", None)
        if processor is not None:
            await processor.aclose(drain=True, drain_timeout=self.settings.drain_timeout)
            self._gauges.cancel()
            self.metrics.update_gauges()

    def __repr__(self) -> str:
        return (
            f"<ModelReplica {getattr(self, 'replica', '?')} {getattr(self, 'processor', None)!r}>"
        )
