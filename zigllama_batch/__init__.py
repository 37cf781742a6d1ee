"""zigllama_batch: serve a LLaMA-family GGUF model to many concurrent callers by batching.

The numpy engine (:class:`LLaMAModel`, :class:`Tokenizer`, :class:`TextGenerator`) runs one model
on the CPU; the batch processor (next to come) shares it between asyncio callers.
"""

from .engine.gguf_loader import LlamaConfig
from .engine.model import LLaMAModel
from .engine.tokenizer import Tokenizer
from .errors import (
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
    ChatMessage,
    FinishReason,
    GenerationConfig,
    GenerationResult,
    Prompt,
    StreamCallback,
)
from .generator import TextGenerator, load_model

__version__ = "0.1.0"

__all__ = [
    "ChatMessage",
    "FinishReason",
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "InvalidRequest",
    "LLaMAModel",
    "LlamaConfig",
    "ModelLoadError",
    "ProcessorStopped",
    "Prompt",
    "PromptTooLong",
    "QueueFull",
    "RequestCancelled",
    "RequestTimeout",
    "StreamCallback",
    "TextGenerator",
    "Tokenizer",
    "ZigllamaBatchError",
    "__version__",
    "load_model",
]
