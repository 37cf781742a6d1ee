"""zigllama_batch: serve a LLaMA-family GGUF model to many concurrent callers by batching.

The numpy engine (:class:`LLaMAModel`, :class:`Tokenizer`, :class:`TextGenerator`) runs one model
on the CPU; :class:`BatchProcessor` shares it between asyncio callers::

    async with BatchProcessor(model, tokenizer, BatchConfig(strategy="continuous")) as processor:
        result = await processor.submit(BatchRequest(prompt="Hello"))
"""

from . import _blas_env  # noqa: F401  (first: before numpy loads OpenBLAS)
from .batching import (
    BatchConfig,
    BatchingStrategy,
    BatchProcessor,
    BatchRequest,
    BatchResult,
    BatchStats,
    ManualClock,
    ProcessorState,
    RequestStream,
    RequestTimeline,
    StreamChunk,
)
from .engine.gguf_loader import LlamaConfig, LoadProgress, LoadProgressCallback
from .engine.model import LLaMAModel
from .engine.tokenizer import Tokenizer
from .errors import (
    CallbackFailed,
    ConstraintFailed,
    GenerationError,
    InvalidRequest,
    ModelLoadError,
    ProcessorStopped,
    PromptTooLong,
    QueueFull,
    RequestCancelled,
    RequestTimeout,
    ZigllamaBatchError,
)
from .generation import (
    Activations,
    ChatMessage,
    FinishReason,
    GenerationConfig,
    GenerationResult,
    Prompt,
    StreamCallback,
    TokenLogprob,
)
from .generator import TextGenerator, load_model
from .structured import StructuredOutput

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "BatchConfig",
    "BatchProcessor",
    "BatchRequest",
    "BatchResult",
    "BatchStats",
    "BatchingStrategy",
    "CallbackFailed",
    "ChatMessage",
    "ConstraintFailed",
    "FinishReason",
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "InvalidRequest",
    "LLaMAModel",
    "LlamaConfig",
    "LoadProgress",
    "LoadProgressCallback",
    "ManualClock",
    "ModelLoadError",
    "ProcessorState",
    "ProcessorStopped",
    "Prompt",
    "PromptTooLong",
    "QueueFull",
    "RequestCancelled",
    "RequestStream",
    "RequestTimeline",
    "RequestTimeout",
    "StreamCallback",
    "StreamChunk",
    "StructuredOutput",
    "TextGenerator",
    "TokenLogprob",
    "Tokenizer",
    "ZigllamaBatchError",
    "__version__",
    "load_model",
]
