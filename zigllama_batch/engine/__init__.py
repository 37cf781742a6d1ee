"""The numeric side: GGUF loading, the numpy LLaMA forward pass, tokenizer and sampling.

Nothing here knows about asyncio. The pieces, in the order data flows through them:
``gguf_loader`` (file -> config + float32 weights), ``tokenizer`` (text <-> ids), ``model``
(``LLaMAModel.step``: one ragged forward pass), ``kv_cache`` (slots), ``sampler`` (next tokens),
``runner`` (``Engine.step``: forward + sampling), ``output`` (ids -> text with stop rules) and
``hub`` (the default model's download and cache).
"""

from .gguf_loader import LlamaConfig, read_gguf
from .kv_cache import KVCache
from .model import LLaMAModel, StepInput
from .output import OutputDecoder
from .runner import Engine, SequenceStep, TokenSample
from .sampler import SamplingState
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "Engine",
    "IncrementalDetokenizer",
    "KVCache",
    "LLaMAModel",
    "LlamaConfig",
    "OutputDecoder",
    "SamplingState",
    "SequenceStep",
    "StepInput",
    "TokenSample",
    "Tokenizer",
    "read_gguf",
]
