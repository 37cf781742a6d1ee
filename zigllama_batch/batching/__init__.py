"""The asyncio side: queue, batching strategies, scheduler, streams and the BatchProcessor.

Nothing here touches numpy arrays: the scheduler hands plain data to the engine's ``step()``
in a worker thread and gets plain data back. The pieces, in the order a request meets them:
``types`` (what callers pass and get), ``processor`` (the facade), ``lifecycle`` (the
processor's states), ``request`` (one request's state and outcome), ``queue`` (waiting
requests), ``deadlines`` (ending requests at their deadline), ``strategies`` (who runs when),
``scheduler`` (the loop), ``executor`` (steps and request preparation in threads),
``delivery`` (token callbacks), ``results`` (a finished request's result), ``stream`` (tokens
as they come), ``stats`` (what operators read), ``home`` (calls from other event loops) and
``clock`` (time, replaceable in tests).
"""

from ..errors import CallbackFailed
from .clock import Clock, ManualClock, MonotonicClock
from .lifecycle import ProcessorState
from .processor import BatchProcessor
from .request import RequestState
from .stats import Bookkeeping, StatsObserver
from .stream import RequestStream
from .types import (
    BatchConfig,
    BatchingStrategy,
    BatchRequest,
    BatchResult,
    BatchStats,
    EngineLike,
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
    "Bookkeeping",
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
