"""What the OpenAI app needs from whatever runs its requests.

Inside: :class:`Backend` and :class:`ChunkStream`, structural types. A
:class:`~zigllama_batch.BatchProcessor` is a backend as it is; so is the Ray Serve ingress's
:class:`~zigllama_batch.ray_serve.RemoteProcessor`, which tokenizes locally and runs requests on
model replicas. One app serves both, so the HTTP behaviour cannot drift between them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from ..batching.lifecycle import ProcessorState
from ..batching.stats import StatsRecorder
from ..batching.types import BatchRequest, BatchResult, StreamChunk
from ..engine.tokenizer import Tokenizer
from ..generation import Prompt
from ..kv import KVStats
from ..structured import StructuredOutput

__all__ = ["Backend", "ChunkStream"]


class ChunkStream(Protocol):
    """One request's chunks; after the last one :attr:`result` holds its result, and closing
    the stream early cancels the request."""

    result: BatchResult | None

    def __aiter__(self) -> AsyncIterator[StreamChunk]: ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    """Runs requests for the app: :class:`~zigllama_batch.BatchProcessor`'s serving surface.

    Every method raises what the processor's method of the same name raises.
    """

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def model_name(self) -> str: ...

    @property
    def max_context(self) -> int: ...

    @property
    def state(self) -> ProcessorState: ...

    @property
    def failure(self) -> BaseException | None: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    def kv_stats(self) -> KVStats | None: ...

    @property
    def stats_recorder(self) -> StatsRecorder: ...

    async def start(self) -> None: ...

    async def aclose(self, drain: bool = True, *, drain_timeout: float | None = None) -> None: ...

    def encode_prompt(
        self, prompt: Prompt, *, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]: ...

    def check_prompt_length(self, prompt: object) -> None: ...

    async def check_structured(self, structured: StructuredOutput) -> None: ...

    async def submit(self, request: BatchRequest) -> BatchResult: ...

    def stream(self, request: BatchRequest) -> ChunkStream: ...
