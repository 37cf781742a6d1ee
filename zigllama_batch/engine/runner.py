"""The numeric step every generation goes through: one forward pass plus sampling.

Inside: :class:`Model` (what the engine needs of a model: its config, ``new_cache()`` and
``step()``; :class:`~zigllama_batch.engine.model.LLaMAModel` is one, and another architecture
plugs in by being one too) and :class:`Engine`, which owns a model, its tokenizer and the
storage of a KV cache. ``Engine.step`` takes plain data (a list of
:class:`~zigllama_batch.engine.step.SequenceStep`) and returns plain data, runs in a worker
thread, and is the signature the batch processor is written against (its tests use a fake with
the same one). Which slot a sequence takes is decided by the engine's owner (the batch
processor's :class:`~zigllama_batch.kv.KVManager`, or a generator's slot table).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from ..generation import GenerationConfig
from ..kv.storage import KVBlocks, KVCache
from ..structured import StructuredOutput
from .grammar import GrammarCompiler
from .sampler import SamplingState, sample
from .step import SequenceStep, TokenSample
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MAX_CONTEXT",
    "DEFAULT_PREFILL_CHUNK",
    "Engine",
    "Model",
    "ModelConfig",
]

DEFAULT_MAX_CONTEXT = 2048
"""Positions a cache slot holds unless told otherwise: room for a long chat turn while 32 slots of
a small model stay near a gigabyte. Capped by the model's own context length."""

DEFAULT_PREFILL_CHUNK = 512
"""Most prompt tokens one sequence feeds in one step, wherever it runs: bounds the attention
scores of a long prompt to heads x 512 x context floats (and, in a shared batch, how long one
step holds up the others) while keeping the matrix multiplies large."""


class ModelConfig(Protocol):
    """The facts about a model that the engine reads."""

    @property
    def name(self) -> str:
        """The model's name (for a GGUF model, its file name without ``.gguf``)."""
        ...

    @property
    def context_length(self) -> int:
        """Positions the model was trained for."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids the model scores."""
        ...


class Model(Protocol):
    """What :class:`Engine` needs of a model; any architecture with these plugs in."""

    @property
    def config(self) -> ModelConfig:
        """The model's facts."""
        ...

    def new_cache(self, n_slots: int, max_context: int | None = None) -> KVCache:
        """Storage for the keys and values of ``n_slots`` sequences of ``max_context``
        positions."""
        ...

    def step(self, items: Sequence[SequenceStep], cache: KVCache) -> NDArray[np.float32]:
        """One forward pass over a ragged batch; the next-token logits of each item's last
        ``item.logit_rows`` new tokens, item after item, ``(rows, vocab)``."""
        ...


class Engine:
    """A model, its tokenizer and a KV cache of ``n_slots`` sequences.

    :meth:`step` may run in a worker thread, touching only the slots its items name; which
    sequence holds which slot is the caller's bookkeeping.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        *,
        n_slots: int = 1,
        max_context: int | None = None,
    ) -> None:
        """Args:
        model: the weights and forward pass.
        tokenizer: the model's tokenizer.
        n_slots: sequences that can be in flight at once.
        max_context: positions per slot (prompt plus output); default
            ``min(DEFAULT_MAX_CONTEXT, model context)``.
        """
        vocab_size = model.config.vocab_size
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model scores {vocab_size}"
            )
        self.model = model
        self.tokenizer = tokenizer
        context = max_context or min(DEFAULT_MAX_CONTEXT, model.config.context_length)
        self.cache: KVCache = model.new_cache(n_slots, context)
        self.grammars = GrammarCompiler(tokenizer, vocab_size)
        """Compiled output constraints (structured output), shared by this engine's requests."""
        self.pool: KVBlocks | None = None
        """Host-memory blocks of evicted prefixes, once :meth:`reserve_pool` made them (which
        block holds what is the owner's bookkeeping, as slots are)."""

    @property
    def n_slots(self) -> int:
        """Sequences the cache holds at once."""
        return self.cache.n_slots

    @property
    def max_context(self) -> int:
        """Positions one sequence may occupy, prompt included."""
        return self.cache.max_context

    @property
    def model_name(self) -> str:
        """The model's name."""
        return self.model.config.name

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values one position takes, all layers together."""
        return self.cache.nbytes // (self.cache.n_slots * self.cache.max_context)

    def reserve_pool(self, n_blocks: int, block_tokens: int) -> None:
        """Reserve host memory for ``n_blocks`` blocks of ``block_tokens`` positions of evicted
        prefixes, which steps then save to and restore from (see ``SequenceStep``)."""
        self.pool = KVBlocks(self.cache, n_blocks, block_tokens)

    def release_kv(self, slot: int, keep: int) -> None:
        """Give the memory of ``slot``'s positions from ``keep`` on back to the OS (no step may
        be using the slot)."""
        self.cache.release(slot, keep)

    def new_sampling(self, config: GenerationConfig, prompt_ids: Sequence[int]) -> SamplingState:
        """Sampling state (random stream, penalty counts, output constraint) for a new
        sequence.

        Raises:
            InvalidRequest: the config's output constraint does not compile.
        """
        # The most tokens the sequence may generate: what ends it with `length` (output.py).
        budget = max(1, min(config.max_tokens, self.max_context - len(prompt_ids)))
        hook = (
            None
            if config.structured is None
            else self.grammars.hook(
                config.structured, jump_forward=not config.logprobs, budget=budget
            )
        )
        return SamplingState(config, prompt_ids, self.model.config.vocab_size, hook=hook)

    def check_structured(self, structured: StructuredOutput) -> None:
        """Compile an output constraint now (cached), so that a bad one fails early.

        Raises:
            InvalidRequest: it does not compile (the message says why).
        """
        self.grammars.check(structured)

    def step(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        """Run one forward pass over ``items``, score the prompt chunks that are scored (into
        their :class:`~zigllama_batch.engine.scoring.PromptScores`) and sample where asked.

        An item with drafted tokens is verified: a token is sampled at the position before
        the drafts, as for any item; while it equals the next draft, the next one is sampled
        at that draft's position. Each is chosen exactly as without drafts (the same
        penalties, constraint, temperature and random draws, in the same order), so the output
        is the one the sequence would have produced one token a step; only the number of steps
        differs. (For a draft that is one token, not a distribution, drawing from the target
        and accepting when the draw is the draft is speculative sampling's rule.)

        Returns:
            One entry per item: the sampled token (after the drafts it accepted), or None for
            items without a sampling state.
        """
        moves = [(it.slot, it.start_pos, it.transfer) for it in items if it.transfer is not None]
        if moves:  # prefix reuse, before the forward pass
            self.cache.prepare(moves, self.pool)
        logits = self.model.step(items, self.cache)
        first = np.cumsum([0, *(it.logit_rows for it in items)])  # each item's first logits row
        for i, it in enumerate(items):
            if it.scores is not None:  # a row for each of its positions
                it.scores.score(it.start_pos, logits[first[i] : first[i + 1]])
        # The row each item samples at first: its last, or the one before its drafts.
        at = [first[i] + it.logit_rows - 1 - it.draft for i, it in enumerate(items)]
        rows = [i for i, it in enumerate(items) if it.sampling is not None]
        out: list[TokenSample | None] = [None] * len(items)
        if not rows:
            return out
        states = [s for it in items if (s := it.sampling) is not None]
        # Every item samples one row, as a rule: hand the logits over as they are (a copy of 32
        # rows of a 262k vocabulary costs ~9 ms).
        plain = len(rows) == len(items) == logits.shape[0]
        tokens, logprobs = sample(logits if plain else logits[[at[i] for i in rows]], states)
        accepted: dict[int, list[tuple[int, float]]] = {}
        verifying = [j for j, i in enumerate(rows) if items[i].draft]  # indexes into states
        d = 0  # the draft each verifying item compares its last choice with
        while verifying:
            going = []
            for j in verifying:
                it, state = items[rows[j]], states[j]
                if tokens[j] == it.token_ids[len(it.token_ids) - it.draft + d] and _goes_on(state):
                    accepted.setdefault(j, []).append((int(tokens[j]), float(logprobs[j])))
                    going.append(j)
            d += 1
            if not going:
                break
            # Choose again at the accepted draft's position (logits row d of the item).
            more, more_logprobs = sample(
                logits[[at[rows[j]] + d for j in going]], [states[j] for j in going]
            )
            for k, j in enumerate(going):
                tokens[j], logprobs[j] = more[k], more_logprobs[k]
            verifying = [j for j in going if d < items[rows[j]].draft]
        for j, i in enumerate(rows):
            hook = states[j].hook
            out[i] = TokenSample(
                int(tokens[j]),
                float(logprobs[j]),
                states[j].forced,
                completes=hook is not None and hook.finished,
                constraint_error=None if hook is None else hook.error,
                accepted=tuple(accepted.get(j, ())),
            )
        return out

    def __repr__(self) -> str:
        return f"Engine({self.model!r}, {self.cache!r})"


def _goes_on(state: SamplingState) -> bool:
    """True when a sequence may accept its next draft after its last choice: its constraint
    forced nothing after that token, is not complete and has not failed."""
    hook = state.hook
    return not state.forced and (hook is None or (not hook.finished and hook.error is None))
