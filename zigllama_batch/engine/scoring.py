"""Log-probabilities of given tokens under a step's logits: a chosen token's, and a prompt's own.

Inside: :func:`token_logprobs` (each logits row's log-softmax at one token, and the row's most
likely tokens, in float64: the sampler reports a chosen token's logprob with it too) and
:class:`PromptScores` (one sequence's prompt logprobs, gathered over the steps that feed its
prompt).

A prompt chunk that is scored gets the logits of every one of its positions from the model, not
only its last (:attr:`~zigllama_batch.engine.step.SequenceStep.logit_rows`). Position p's row
scores prompt token p + 1, so the last row of a chunk scores the first token of the next chunk,
and the last prompt position is left to the sampler. The first prompt token has no score:
nothing comes before it. Positions computed from a cached prefix have no logits, so a scored
sequence never reuses one (:attr:`~zigllama_batch.engine.step.SequenceState.may_reuse_prefix`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from ..generation import TokenLogprob

__all__ = ["PromptScores", "token_logprobs"]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

_ROWS_AT_ONCE = 64
"""Logits rows converted to float64 at once: 64 rows of a 49,152-token vocabulary are 25 MB,
where a whole 512-token chunk would be 200 MB."""


def token_logprobs(logits: F32, token_ids: I64, top: int = 0) -> tuple[F64, I64, F64]:
    """Each row's log-probability of one token, and its ``top`` most likely tokens.

    Args:
        logits: ``(rows, vocab)`` raw logits; not modified.
        token_ids: ``(rows,)`` the token to score in each row.
        top: alternatives per row (0: none).

    Returns:
        ``(logprobs, top_ids, top_logprobs)``: ``(rows,)`` the tokens' log-softmax, computed
        in float64 with the row's maximum taken out first; ``(rows, top)`` the most likely
        ids, best first (ties by the lower id), and ``(rows, top)`` their logprobs.
    """
    rows, vocab = logits.shape
    top = min(top, vocab)
    chosen = np.empty(rows)
    best_ids = np.empty((rows, top), np.int64)
    best = np.empty((rows, top))
    for r0 in range(0, rows, _ROWS_AT_ONCE):
        block = logits[r0 : r0 + _ROWS_AT_ONCE].astype(np.float64)  # (n, vocab)
        n = len(block)
        peak = block.max(axis=1)
        lse = peak + np.log(np.exp(block - peak[:, None]).sum(axis=1))  # (n,)
        chosen[r0 : r0 + n] = block[np.arange(n), token_ids[r0 : r0 + n]] - lse
        if top:
            ids = _most_likely(block, top)  # (n, top)
            best_ids[r0 : r0 + n] = ids
            best[r0 : r0 + n] = np.take_along_axis(block, ids, axis=1) - lse[:, None]
    return chosen, best_ids, best


def _most_likely(block: F64, k: int) -> I64:
    """Each row's ``k`` largest entries' ids, ordered by (value desc, id asc)."""
    vocab = block.shape[1]
    kth = np.partition(block, vocab - k, axis=1)[:, vocab - k]  # (n,) the k-th largest value
    out = np.empty((len(block), k), np.int64)
    for r in range(len(block)):
        ids = np.flatnonzero(block[r] >= kth[r])  # ascending ids; ties at the k-th add a few
        order = np.argsort(-block[r, ids], kind="stable")[:k]  # stable: ties keep id order
        out[r] = ids[order]
    return out


class PromptScores:
    """One sequence's prompt logprobs, filled in by the engine steps that feed its prompt.

    Each position is scored once: a sequence that computes its prompt again (preempted and
    recomputed) leaves the scores it has as they are. The steps run in the engine's thread; the
    owner reads the scores between steps.
    """

    __slots__ = ("_alternatives", "_logprobs", "prompt_ids", "top")

    def __init__(self, prompt_ids: Sequence[int], top: int) -> None:
        """Args:
        prompt_ids: the prompt to score (at least one token).
        top: most likely alternatives to keep at each position.
        """
        self.prompt_ids = list(prompt_ids)
        self.top = top
        self._logprobs: list[float] = []  # entry p: prompt token p + 1 given tokens 0..p
        self._alternatives: list[tuple[tuple[int, float], ...]] = []

    @property
    def complete(self) -> bool:
        """True once every prompt token after the first has its score."""
        return len(self._logprobs) >= len(self.prompt_ids) - 1

    def score(self, start: int, logits: F32) -> None:
        """Take the logits of consecutive positions from ``start`` on (``(rows, vocab)``, from
        a step that fed them): each row scores the prompt token after its position, where
        that token is not scored yet.

        Raises:
            ValueError: positions before ``start`` are not scored yet (they were not computed
                by a step that scored them: a reused prefix).
        """
        done = len(self._logprobs)
        if start > done:
            raise ValueError(
                f"prompt positions {done}..{start - 1} have no scores: a scored prompt must be "
                "computed whole"
            )
        targets = self.prompt_ids[done + 1 : start + len(logits) + 1]
        if not targets:
            return
        rows = logits[done - start : done - start + len(targets)]
        chosen, ids, best = token_logprobs(rows, np.asarray(targets, np.int64), self.top)
        self._logprobs.extend(chosen.tolist())
        self._alternatives.extend(
            tuple(zip(i, b, strict=True)) for i, b in zip(ids.tolist(), best.tolist(), strict=True)
        )

    def result(self) -> tuple[TokenLogprob | None, ...]:
        """One entry per prompt token: None for the first, then each token's score.

        Raises:
            RuntimeError: the prompt is not scored whole yet.
        """
        if not self.complete:
            raise RuntimeError(
                f"{len(self._logprobs)} of {len(self.prompt_ids) - 1} prompt tokens scored"
            )
        scored = zip(self.prompt_ids[1:], self._logprobs, self._alternatives, strict=False)
        return (None, *(TokenLogprob(t, lp, top) for t, lp, top in scored))

    def __repr__(self) -> str:
        return (
            f"PromptScores(prompt={len(self.prompt_ids)}, scored={len(self._logprobs)}, "
            f"top={self.top})"
        )
