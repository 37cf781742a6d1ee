"""The numeric side: GGUF loading, the numpy Llama-family forward pass, tokenizer and sampling.

Nothing here knows about asyncio. The pieces, in the order data flows through them:
``architecture`` (the table of what differs between Llama, Qwen2, Qwen3 and Gemma 3),
``gguf_loader`` (file -> config + weights kept in their GGUF types), ``kernels`` (the one seam
for a product with a weight, whatever its type), ``tokenizer`` (text <-> ids), ``step``
(``SequenceStep``: what a step takes per sequence; ``SequenceState``: a sequence's progress),
``model`` (``LLaMAModel.step``: one ragged forward pass, writing keys and values into
:mod:`zigllama_batch.kv`'s storage), ``scoring`` (log-probabilities of given tokens: a
prompt's own, gathered chunk by chunk), ``sampler`` (next tokens, with a
per-sequence logits hook), ``grammar`` (that hook for an output constraint, with
``json_schema`` and ``closing``: objects closed by default, completion within the budget),
``runner`` (``Engine.step``: forward + sampling, typed against the
``Model`` protocol; drafted tokens verified), ``drafts`` and ``draft_model`` (what speculative
decoding drafts: prompt lookup, or a smaller model of the same vocabulary), ``output`` (ids -> text with stop rules, and the finished result) and ``hub``
(packaged models by name: download, verification, cache); ``tokenizer_files`` writes a
tokenizer as the files Hugging Face's libraries read.
"""

from .draft_model import DraftItem, DraftModel
from .gguf_loader import LlamaConfig, LoadProgress, LoadProgressCallback, read_gguf
from .model import LLaMAModel
from .output import OutputDecoder
from .runner import DEFAULT_PREFILL_CHUNK, Engine, Model, ModelConfig
from .sampler import LogitsHook, SamplingState
from .scoring import PromptScores
from .step import SequenceState, SequenceStep, TokenSample
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .tokenizer_files import save_tokenizer_files

__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "DraftItem",
    "DraftModel",
    "Engine",
    "IncrementalDetokenizer",
    "LLaMAModel",
    "LlamaConfig",
    "LoadProgress",
    "LoadProgressCallback",
    "LogitsHook",
    "Model",
    "ModelConfig",
    "OutputDecoder",
    "PromptScores",
    "SamplingState",
    "SequenceState",
    "SequenceStep",
    "TokenSample",
    "Tokenizer",
    "read_gguf",
    "save_tokenizer_files",
]
