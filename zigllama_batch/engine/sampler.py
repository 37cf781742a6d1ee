"""Batched next-token sampling with per-request settings and per-request random streams.

Inside: :class:`SamplingState` (one sequence's settings, random generator and token counts) and
:func:`sample` (picks one token per row of a logits matrix).

Order of operations, as in Hugging Face and vLLM: penalties, then temperature, top-k, top-p,
min-p, then one uniform draw from the request's own generator. Greedy rows skip the draw. Because
each request owns its generator and candidates are ordered by (probability, token id), the same
seed and prompt give the same tokens whatever else is in the batch.

Top-p and min-p look only at the highest ``_CANDIDATES`` tokens when their probability mass
already reaches ``top_p`` there (almost always: language models are peaked); otherwise the whole
vocabulary is sorted. Both give the same nucleus. Stop strings and stop tokens are handled by the
caller on the text side (see :mod:`zigllama_batch.engine.output`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from ..generation import GenerationConfig

__all__ = ["SamplingState", "sample"]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

_CANDIDATES = 1024  # tokens kept after the first partial sort; holds the nucleus in practice


class SamplingState:
    """One sequence's sampling settings, random generator and token counts for penalties."""

    __slots__ = ("_generated_counts", "_seen", "config", "rng")

    def __init__(
        self, config: GenerationConfig, prompt_ids: Sequence[int], vocab_size: int
    ) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        # Token bookkeeping only when a penalty needs it: prompt + output for the repetition
        # penalty, output counts for presence/frequency penalties (OpenAI semantics).
        self._seen: NDArray[np.bool_] | None = None
        self._generated_counts: NDArray[np.int32] | None = None
        if config.repetition_penalty != 1.0:
            self._seen = np.zeros(vocab_size, np.bool_)
            self._seen[np.asarray(prompt_ids, dtype=np.int64)] = True
        if config.presence_penalty or config.frequency_penalty:
            self._generated_counts = np.zeros(vocab_size, np.int32)

    def record(self, token_id: int) -> None:
        """Account for a token the sequence generated."""
        if self._seen is not None:
            self._seen[token_id] = True
        if self._generated_counts is not None:
            self._generated_counts[token_id] += 1

    def apply_penalties(self, logits: F32) -> None:
        """Penalise, in place, the logits (vocab,) of tokens already seen or generated."""
        c = self.config
        if self._seen is not None:
            seen = np.flatnonzero(self._seen)
            vals = logits[seen]
            logits[seen] = np.where(
                vals > 0, vals / c.repetition_penalty, vals * c.repetition_penalty
            )
        if self._generated_counts is not None:
            used = np.flatnonzero(self._generated_counts)
            counts = self._generated_counts[used].astype(np.float32)
            logits[used] -= c.presence_penalty + c.frequency_penalty * counts


def sample(logits: F32, states: Sequence[SamplingState]) -> tuple[NDArray[np.int64], F32]:
    """Pick the next token of every row.

    Args:
        logits: ``(rows, vocab)`` raw logits, one row per sequence; not modified.
        states: the sequences' sampling states, in row order; updated with the chosen tokens.

    Returns:
        ``(token_ids, logprobs)``: the chosen ids ``(rows,)`` and their log-probabilities under
        the raw distribution ``(rows,)`` (NaN for rows that did not ask for logprobs).
    """
    rows = logits.shape[0]
    if rows != len(states):
        raise ValueError(f"{rows} logits rows but {len(states)} sampling states")
    tokens = np.empty(rows, np.int64)
    logprobs = np.full(rows, np.nan, np.float32)

    work = logits
    penalised = [i for i, s in enumerate(states) if s.config.has_penalties]
    if penalised:
        work = logits.copy()
        for i in penalised:
            states[i].apply_penalties(work[i])

    greedy = [i for i, s in enumerate(states) if s.config.is_greedy]
    if greedy:
        tokens[greedy] = np.argmax(work[greedy], axis=1)
    drawn = [i for i, s in enumerate(states) if not s.config.is_greedy]
    if drawn:
        tokens[drawn] = _draw(work[drawn], [states[i] for i in drawn])

    wants_logprobs = [i for i, s in enumerate(states) if s.config.logprobs]
    if wants_logprobs:
        raw = logits[wants_logprobs].astype(np.float64)
        top = raw.max(axis=1)
        lse = top + np.log(np.exp(raw - top[:, None]).sum(axis=1))
        chosen = raw[np.arange(len(wants_logprobs)), tokens[wants_logprobs]]
        logprobs[wants_logprobs] = chosen - lse
    for i, state in enumerate(states):
        state.record(int(tokens[i]))
    return tokens, logprobs


def _draw(logits: F32, states: Sequence[SamplingState]) -> NDArray[np.int64]:
    """Sample one token per row with temperature, top-k, top-p and min-p."""
    rows, vocab = logits.shape
    configs = [s.config for s in states]
    temps = np.array([c.temperature for c in configs], np.float32)[:, None]
    scaled = logits / temps  # (rows, vocab)
    k_of = np.array([c.top_k if c.top_k > 0 else vocab for c in configs])
    n_cand = int(min(vocab, max([_CANDIDATES, *(int(k) for k in k_of if k < vocab)])))

    # The n_cand best tokens of each row, ordered by (value descending, token id).
    if n_cand < vocab:
        idx = np.argpartition(-scaled, n_cand - 1, axis=1)[:, :n_cand]
    else:
        idx = np.broadcast_to(np.arange(vocab), (rows, vocab))
    vals = np.take_along_axis(scaled, idx, axis=1).astype(np.float64)
    order = np.lexsort((idx, -vals), axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)

    # Probabilities: over the row's top-k when it has one, else over the whole vocabulary.
    col = np.arange(n_cand)[None, :]
    in_k = col < k_of[:, None]
    vals = np.where(in_k, vals, -np.inf)
    top = vals[:, :1]
    limited = k_of <= n_cand
    norm = np.where(
        limited,
        np.log(np.exp(vals - top).sum(axis=1)),
        np.log(np.exp(scaled.astype(np.float64) - top).sum(axis=1)),
    )
    probs = np.exp(vals - top - norm[:, None])  # (rows, n_cand)

    top_p = np.array([c.top_p for c in configs])[:, None]
    min_p = np.array([c.min_p for c in configs])[:, None]
    mass_before = np.cumsum(probs, axis=1) - probs
    keep = in_k & (mass_before < top_p) & (probs >= min_p * probs[:, :1])
    # Rows whose distribution reaches past the candidates need the whole vocabulary.
    unfiltered = (top_p[:, 0] >= 1.0) & (min_p[:, 0] <= 0.0)
    escapes = ~limited & (unfiltered | (mass_before[:, -1] + probs[:, -1] < top_p[:, 0]))

    chosen = np.empty(rows, np.int64)
    for r in range(rows):
        u = states[r].rng.random()
        if escapes[r]:
            chosen[r] = _draw_full(scaled[r], configs[r], u)
            continue
        p = np.where(keep[r], probs[r], 0.0)
        cdf = np.cumsum(p)
        pick = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        chosen[r] = idx[r, min(pick, n_cand - 1)]
    return chosen


def _draw_full(scaled: F32, config: GenerationConfig, u: float) -> int:
    """Sample from the whole vocabulary (no top-k): plain temperature, or a wide nucleus."""
    x = scaled.astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    ids = np.arange(p.size)
    if config.top_p < 1.0 or config.min_p > 0.0:
        ids = np.lexsort((ids, -p))
        p = p[ids]
        mass_before = np.cumsum(p) - p
        p = np.where((mass_before < config.top_p) & (p >= config.min_p * p[0]), p, 0.0)
    cdf = np.cumsum(p)
    pick = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(ids[min(pick, p.size - 1)])
