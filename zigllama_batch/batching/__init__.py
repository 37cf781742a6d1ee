"""The asyncio side: queue, batching strategies, scheduler, streams and the BatchProcessor.

Nothing here touches numpy arrays: the scheduler hands plain data to the engine's ``step()``
in a worker thread and gets plain data back. The pieces, in the order a request meets them:
``types`` (what callers pass and get), ``processor`` (the facade), ``queue`` (waiting requests),
``strategies`` (who runs when), ``scheduler`` (the loop), ``stream`` (tokens as they come),
``stats`` (what operators read) and ``clock`` (time, replaceable in tests).
"""

from .clock import Clock, ManualClock, MonotonicClock
from .processor import BatchProcessor, ProcessorState
from .request import RequestState
from .scheduler import CallbackFailed, EngineLike
from .stats import StatsObserver
from .stream import RequestStream
from .types import (
    BatchConfig,
    BatchingStrategy,
    BatchRequest,
    BatchResult,
    BatchStats,
    Percentiles,
    RequestId,
    RequestTimeline,
    StreamChunk,
    TokenCallback,
)

__all__ = [
    "BatchConfig",
    "BatchProcessor",
    "BatchRequest",
    "BatchResult",
    "BatchStats",
    "BatchingStrategy",
    "CallbackFailed",
    "Clock",
    "EngineLike",
    "ManualClock",
    "MonotonicClock",
    "Percentiles",
    "ProcessorState",
    "RequestId",
    "RequestState",
    "RequestStream",
    "RequestTimeline",
    "StatsObserver",
    "StreamChunk",
    "TokenCallback",
]
