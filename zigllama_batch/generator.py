"""Loading a model and generating text from it, one request at a time.

Inside: :func:`load_model` (a GGUF path, or the default model fetched on first use) and
:class:`TextGenerator`, the synchronous single-sequence front end: ``generate()`` returns a
:class:`~zigllama_batch.generation.GenerationResult`, ``stream()`` yields text chunks. It runs the
same :class:`~zigllama_batch.engine.runner.Engine` step as the batch processor, with one slot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .engine.gguf_loader import read_gguf
from .engine.hub import default_model_path
from .engine.model import LLaMAModel
from .engine.output import OutputDecoder
from .engine.runner import Engine, SequenceStep
from .engine.tokenizer import Tokenizer
from .errors import PromptTooLong
from .generation import GenerationConfig, GenerationResult, Prompt, StreamCallback

__all__ = ["PREFILL_CHUNK", "TextGenerator", "load_model"]

PREFILL_CHUNK = 512
"""Prompt tokens per forward step: bounds the attention scores of a long prompt to
heads x 512 x context floats while keeping the matrix multiplies large."""


def load_model(
    path: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> tuple[LLaMAModel, Tokenizer]:
    """Load a Llama-architecture GGUF model and its tokenizer.

    Args:
        path: a GGUF file; None means the default model (SmolLM2-135M-Instruct), fetched and
            verified on first use.
        progress: show download progress on stderr.

    Raises:
        ModelLoadError: the file is missing, malformed or unsupported, or cannot be fetched.
    """
    if path is None:
        path = default_model_path(progress=progress)
    contents = read_gguf(path)
    return LLaMAModel(contents.config, contents.weights), Tokenizer(contents.metadata)


@dataclass(slots=True)
class _Run:
    """One generation in progress."""

    prompt_ids: list[int]
    config: GenerationConfig
    decoder: OutputDecoder
    started: float
    first_token: float | None = None


class TextGenerator:
    """Generates text for one prompt at a time (the batch processor serves many at once)."""

    def __init__(
        self, model: LLaMAModel, tokenizer: Tokenizer, *, max_context: int | None = None
    ) -> None:
        """Args:
        model: the loaded model.
        tokenizer: its tokenizer.
        max_context: most tokens (prompt plus output) of one generation; default
            ``min(2048, model context)``.
        """
        self.engine = Engine(model, tokenizer, n_slots=1, max_context=max_context)
        self.tokenizer = tokenizer

    def generate(
        self,
        prompt: Prompt,
        config: GenerationConfig | None = None,
        *,
        callback: StreamCallback | None = None,
    ) -> GenerationResult:
        """Generate a completion of ``prompt``.

        Args:
            prompt: text, or chat messages rendered with the model's chat template.
            config: decoding settings (default: ``GenerationConfig()``).
            callback: called with ``(text_chunk, token_id)`` for every generated token.

        Raises:
            PromptTooLong: the prompt leaves no room in the context.
            InvalidRequest: the prompt is malformed.
        """
        run = self._start(prompt, config or GenerationConfig())
        for _ in self._tokens(run, callback):
            pass
        return self._result(run)

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None) -> Iterator[str]:
        """Yield the completion of ``prompt`` as text chunks, as they are decoded."""
        run = self._start(prompt, config or GenerationConfig())
        for chunk in self._tokens(run, None):
            if chunk:
                yield chunk

    def _start(self, prompt: Prompt, config: GenerationConfig) -> _Run:
        started = time.perf_counter()
        prompt_ids = self.tokenizer.encode_prompt(prompt)
        if len(prompt_ids) >= self.engine.max_context:
            raise PromptTooLong(len(prompt_ids), self.engine.max_context)
        decoder = OutputDecoder(
            self.tokenizer,
            config,
            prompt_tokens=len(prompt_ids),
            max_context=self.engine.max_context,
        )
        return _Run(prompt_ids=prompt_ids, config=config, decoder=decoder, started=started)

    def _tokens(self, run: _Run, callback: StreamCallback | None) -> Iterator[str]:
        """Run the engine until the decoder finishes; yield each token's text chunk."""
        engine, prompt_ids = self.engine, run.prompt_ids
        slot = engine.allocate_slot()
        try:
            sampling = engine.new_sampling(run.config, prompt_ids)
            pos = 0
            while pos < len(prompt_ids):  # prefill, in chunks
                chunk = prompt_ids[pos : pos + PREFILL_CHUNK]
                last = pos + len(chunk) == len(prompt_ids)
                out = engine.step([SequenceStep(slot, chunk, pos, sampling if last else None)])[0]
                pos += len(chunk)
            while True:
                assert out is not None
                if run.first_token is None:
                    run.first_token = time.perf_counter()
                text = run.decoder.add(out.token_id, out.logprob)
                if callback is not None:
                    callback(text, out.token_id)
                yield text
                if run.decoder.finished:
                    return
                out = engine.step([SequenceStep(slot, [out.token_id], pos, sampling)])[0]
                pos += 1
        finally:
            engine.free_slot(slot)

    def _result(self, run: _Run) -> GenerationResult:
        d = run.decoder
        assert d.finish_reason is not None
        now = time.perf_counter()
        return GenerationResult(
            text=d.text,
            token_ids=tuple(d.token_ids),
            finish_reason=d.finish_reason,
            prompt_tokens=len(run.prompt_ids),
            completion_tokens=len(d.token_ids),
            time_to_first_token_ms=((run.first_token or now) - run.started) * 1000,
            total_time_ms=(now - run.started) * 1000,
            logprobs=tuple(d.logprobs) if run.config.logprobs else None,
        )
