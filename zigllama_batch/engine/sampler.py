"""Batched next-token sampling with per-request settings and per-request random streams.

Inside: :class:`LogitsHook` (a per-sequence adjustment of its logits row, such as a grammar's
token mask), :class:`SamplingState` (one sequence's settings, random generator, token counts and
hook) and :func:`sample` (picks one token per row of a logits matrix).

Order of operations, as in Hugging Face and vLLM: penalties, then the sequence's hook, then
temperature, top-k, top-p, min-p, then one uniform draw from the request's own generator. Greedy
rows skip the draw. Only rows with penalties or a hook get per-row work on their logits. Because
each request owns its generator and candidates are ordered by (probability, token id), the same
seed and prompt give the same tokens whatever else is in the batch.

With a top-k, candidates are the k best tokens. Without one, top-p and min-p find the nucleus
from the sorted probabilities and draw in token-id order, so no step sorts token ids over the
whole vocabulary. Stop strings and stop tokens are handled by the
caller on the text side (see :mod:`zigllama_batch.engine.output`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from ..generation import GenerationConfig
from .scoring import token_logprobs

__all__ = ["LogitsHook", "SamplingState", "sample"]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

_BLOCK = 1024  # tokens per block of the two-level inverse CDF of plain temperature sampling


class LogitsHook(Protocol):
    """Restricts or adjusts one sequence's next-token logits before the token is chosen, and
    follows the tokens chosen (a grammar's matcher, say). Runs in the executor thread."""

    def adjust(self, logits: F32) -> None:
        """Change, in place, this sequence's logits row ``(vocab,)`` (after penalties, before
        temperature and the filters); a banned token gets ``-inf``."""
        ...

    def accept(self, token_id: int) -> tuple[int, ...]:
        """The token chosen for this sequence; returns the tokens the hook forces right after
        it (already followed by the hook: they are fed without being sampled), or ``()``."""
        ...

    @property
    def finished(self) -> bool:
        """True once the hook allows nothing more: the sequence ends (``stop``)."""
        ...

    @property
    def error(self) -> str | None:
        """Why the sequence cannot go on under this hook (it then ends with an error)."""
        ...


class SamplingState:
    """One sequence's sampling settings, random generator, token counts for penalties, and its
    optional :class:`LogitsHook`."""

    __slots__ = ("_generated", "_seen", "config", "forced", "hook", "rng")

    def __init__(
        self,
        config: GenerationConfig,
        prompt_ids: Sequence[int],
        vocab_size: int,
        *,
        hook: LogitsHook | None = None,
    ) -> None:
        self.config = config
        self.hook = hook
        self.forced: tuple[int, ...] = ()
        """Tokens the hook forced after the last chosen one (fed next, without sampling)."""
        seed = config.seed
        self.rng = np.random.default_rng(
            seed % (1 << 64) if seed is not None and seed < 0 else seed
        )
        # Token bookkeeping only when a penalty needs it: prompt + output for the repetition
        # penalty, output counts for presence/frequency penalties (OpenAI semantics).
        self._seen: set[int] | None = None
        self._generated: dict[int, int] | None = None
        if config.repetition_penalty != 1.0:
            self._seen = {int(t) for t in prompt_ids}
        if config.presence_penalty or config.frequency_penalty:
            self._generated = {}

    @property
    def adjusts_logits(self) -> bool:
        """True when this sequence's logits row is changed before the choice."""
        return self.hook is not None or self.config.has_penalties

    def record(self, token_id: int) -> None:
        """Account for a token the sequence generated, and for those its hook forces after
        it (:attr:`forced`)."""
        self.forced = () if self.hook is None else self.hook.accept(token_id)
        for t in (token_id, *self.forced):
            if self._seen is not None:
                self._seen.add(t)
            if self._generated is not None:
                self._generated[t] = self._generated.get(t, 0) + 1

    def adjust(self, logits: F32) -> None:
        """Apply, in place, this sequence's penalties and then its hook to its logits (vocab,)."""
        if self.config.has_penalties:
            self.apply_penalties(logits)
        if self.hook is not None:
            self.hook.adjust(logits)

    def apply_penalties(self, logits: F32) -> None:
        """Penalise, in place, the logits (vocab,) of tokens already seen or generated."""
        c = self.config
        if self._seen:
            seen = np.fromiter(self._seen, np.int64, len(self._seen))
            vals = logits[seen]
            logits[seen] = np.where(
                vals > 0, vals / c.repetition_penalty, vals * c.repetition_penalty
            )
        if self._generated:
            used = np.fromiter(self._generated, np.int64, len(self._generated))
            counts = np.fromiter(self._generated.values(), np.float32, len(self._generated))
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

    greedy = [i for i, s in enumerate(states) if s.config.is_greedy]
    drawn = [i for i, s in enumerate(states) if not s.config.is_greedy]
    if greedy:
        tokens[greedy] = np.argmax(_adjusted(logits, greedy, states, copy=False), axis=1)
    if drawn:
        x = _adjusted(logits, drawn, states, copy=True)
        x /= np.array([states[i].config.temperature for i in drawn], np.float32)[:, None]
        tokens[drawn] = _draw(x, [states[i] for i in drawn])

    wants_logprobs = [i for i, s in enumerate(states) if s.config.logprobs]
    if wants_logprobs:  # as a prompt token's score is computed
        logprobs[wants_logprobs] = token_logprobs(logits[wants_logprobs], tokens[wants_logprobs])[0]
    for i, state in enumerate(states):
        state.record(int(tokens[i]))
    return tokens, logprobs


def _adjusted(logits: F32, rows: list[int], states: Sequence[SamplingState], *, copy: bool) -> F32:
    """The given rows with each sequence's penalties and hook applied: a copy, or ``logits``
    itself when ``copy`` is false, ``rows`` are all of its rows and none of them adjusts its
    logits (for a caller that only reads them)."""
    adjusting = any(states[i].adjusts_logits for i in rows)
    if not copy and not adjusting and len(rows) == logits.shape[0]:
        return logits
    out = logits[rows]
    for j, i in enumerate(rows):
        if states[i].adjusts_logits:
            states[i].adjust(out[j])
    return out


def _draw(scaled: F32, states: Sequence[SamplingState]) -> NDArray[np.int64]:
    """Sample one token per row of temperature-scaled logits with top-k, top-p and min-p.

    Rows fall in three groups, each handled with whole-matrix operations: rows with a top-k
    (candidates: their k best tokens), rows with only top-p / min-p (the nucleus, see
    :func:`_draw_nucleus`) and rows with plain temperature (the whole vocabulary, in token-id
    order).
    """
    rows, vocab = scaled.shape
    configs = [s.config for s in states]
    u = np.array([s.rng.random() for s in states])  # exactly one draw per row and step
    chosen = np.empty(rows, np.int64)

    top_k = [c.top_k if 0 < c.top_k < vocab else 0 for c in configs]
    with_k = [r for r in range(rows) if top_k[r]]
    plain = [
        r
        for r in range(rows)
        if not top_k[r] and configs[r].top_p >= 1.0 and configs[r].min_p <= 0.0
    ]
    nucleus = [r for r in range(rows) if not top_k[r] and r not in plain]

    if with_k:
        k = np.array([top_k[r] for r in with_k])
        idx, vals = _top_k(scaled[with_k], k, [states[r].hook is not None for r in with_k])
        probs = np.exp(vals - vals[:, :1])
        probs /= probs.sum(axis=1, keepdims=True)
        chosen[with_k] = _pick(idx, probs, [configs[r] for r in with_k], u[with_k])
    if plain:
        p = np.exp(scaled[plain] - scaled[plain].max(axis=1, keepdims=True))
        chosen[plain] = np.minimum(
            _count_below(p, u[plain] * p.sum(axis=1, dtype=np.float64)), vocab - 1
        )
    if nucleus:
        chosen[nucleus] = _draw_nucleus(scaled[nucleus], [configs[r] for r in nucleus], u[nucleus])
    # Float rounding at the very top of a CDF can land past the last allowed token (a draw in
    # ~10^8 under a grammar's mask): take the last allowed one instead.
    for r in np.flatnonzero(np.isneginf(scaled[np.arange(rows), chosen])):
        chosen[r] = np.flatnonzero(scaled[r] > -np.inf)[-1]
    return chosen


def _draw_nucleus(x: F32, configs: Sequence[GenerationConfig], u: F64) -> NDArray[np.int64]:
    """Top-p / min-p over the whole vocabulary without sorting token ids.

    The nucleus is every token above the probability of the n-th best, where n is the fewest
    best tokens whose mass reaches top_p, plus (for exact ties at that probability) the
    lowest ids among the tied. Sorting the probabilities alone finds n; the draw then walks
    the nucleus in token-id order.
    """
    rows, vocab = x.shape
    p = np.exp(x - x.max(axis=1, keepdims=True))  # (rows, vocab); the best token has 1.0
    total = p.sum(axis=1, dtype=np.float64)
    top_p = np.array([c.top_p for c in configs])
    min_p = np.array([c.min_p for c in configs], np.float32)
    ascending = np.sort(p, axis=1)
    # The least likely tokens whose mass stays below 1 - top_p are left out; n are kept.
    n = vocab - _count_below(ascending, (1.0 - top_p) * total)
    n = np.clip(n, 1, vocab)
    cut = ascending[np.arange(rows), vocab - n]  # probability of the n-th best
    keep = p >= np.maximum(cut, min_p)[:, None]  # min-p is relative to the best token (1.0)
    for r in np.flatnonzero(keep.sum(axis=1) > n):  # ties at the cut: keep the lowest ids
        tied = np.flatnonzero(p[r] == cut[r])
        keep[r, tied[len(tied) - (int(keep[r].sum()) - n[r]) :]] = False
    p *= keep
    drawn: NDArray[np.int64] = np.minimum(
        _count_below(p, u * p.sum(axis=1, dtype=np.float64)), vocab - 1
    )
    return drawn


def _count_below(w: F32, target: F64) -> NDArray[np.int64]:
    """Per row, how many leading entries of ``w`` (non-negative) have a running sum below
    ``target``: the index an inverse-CDF draw lands on. Two levels (block sums, then one
    block) to avoid a float64 cumulative sum over the whole row."""
    rows, vocab = w.shape
    starts = np.arange(0, vocab, _BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(w, starts, axis=1), axis=1, dtype=np.float64)
    block = (block_cdf < target[:, None]).sum(axis=1)
    out = np.full(rows, vocab, np.int64)
    for r in np.flatnonzero(block < len(starts)):
        b = int(block[r])
        before = block_cdf[r, b - 1] if b else 0.0
        inner = np.cumsum(w[r, starts[b] : starts[b] + _BLOCK], dtype=np.float64)
        out[r] = starts[b] + int((inner < target[r] - before).sum())
    return out


def _top_k(x: F32, k: NDArray[np.int64], masked: Sequence[bool]) -> tuple[NDArray[np.int64], F64]:
    """Each row's k[r] best tokens, ordered by (value desc, id asc), padded with -inf.

    ``masked`` rows (a hook may have set most logits to -inf) are taken one by one over their
    finite logits: partitioning a row that is mostly -inf is several times slower than a dense
    one, and a grammar often leaves only a few tokens.
    """
    rows, vocab = x.shape
    width = int(k.max())
    idx = np.zeros((rows, width), np.int64)
    vals = np.full((rows, width), -np.inf)
    dense = [r for r in range(rows) if not masked[r]]
    threshold = np.full(rows, -np.inf)
    if dense:
        part = np.partition(x[dense], vocab - width, axis=1)[:, vocab - width :]
        best = np.sort(part, axis=1)[:, ::-1]
        threshold[dense] = best[np.arange(len(dense)), k[dense] - 1]  # the k-th largest value
    for r in range(rows):
        if masked[r]:
            ids = np.flatnonzero(x[r] > -np.inf)
            if len(ids) > k[r]:
                kth = np.partition(x[r, ids], len(ids) - k[r])[len(ids) - k[r]]
                ids = ids[x[r, ids] >= kth]
        else:
            ids = np.flatnonzero(x[r] >= threshold[r])  # ascending ids; ties may add a few
        v = x[r, ids].astype(np.float64)
        order = np.argsort(-v, kind="stable")[: k[r]]  # stable: equal values keep id order
        idx[r, : len(order)] = ids[order]
        vals[r, : len(order)] = v[order]
    return idx, vals


def _pick(
    idx: NDArray[np.int64], probs: F64, configs: Sequence[GenerationConfig], u: F64
) -> NDArray[np.int64]:
    """Apply top-p and min-p to sorted candidate probabilities and draw with ``u``."""
    top_p = np.array([c.top_p for c in configs])[:, None]
    min_p = np.array([c.min_p for c in configs])[:, None]
    mass_before = np.cumsum(probs, axis=1) - probs
    keep = (mass_before < top_p) & (probs >= min_p * probs[:, :1]) & (probs > 0)
    cdf = np.cumsum(np.where(keep, probs, 0.0), axis=1)
    pick = (cdf < u[:, None] * cdf[:, -1:]).sum(axis=1)
    pick = np.minimum(pick, keep.sum(axis=1) - 1)
    picked: NDArray[np.int64] = idx[np.arange(len(idx)), pick]
    return picked
