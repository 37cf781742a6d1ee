"""Drafted tokens for speculative decoding: prompt lookup, and the pace every drafter keeps.

Inside: :class:`PromptLookup`, one sequence's n-gram index over its tokens so far (prompt and
output). It proposes what followed the last time the sequence's current ending occurred: the
longest ending of :data:`MAX_NGRAM` down to :data:`MIN_NGRAM` tokens found earlier, its most
recent occurrence, and up to k of the tokens after it (the "prompt lookup decoding" of
vLLM's ``ngram`` drafter and llama.cpp's lookup), running on into its own draft when the
match ends near the sequence's end (text that loops drafts whole periods). Work that copies
from its context (quoting, editing a passage, answering from retrieved text, rewriting code)
gets long drafts; open-ended text mostly gets none, and then nothing is drafted.

:class:`DraftPace` tracks how well one sequence's drafts do, for prompt lookup and the draft
model alike: the number it drafts (:attr:`~DraftPace.limit`) starts small, doubles after
drafts accepted whole and shrinks after rejected ones, and a draft less than half accepted
makes it pause (one step, then two, four, ... up to :data:`MAX_PAUSE` after consecutive
ones), so a sequence whose drafts are wrong stops paying for verifying them.

The other drafter, a second and smaller network, is
:class:`~zigllama_batch.engine.draft_model.DraftModel`. Drafts are deterministic either way,
which is what lets verification stay exact (see
:meth:`~zigllama_batch.engine.runner.Engine.step`).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FIRST_LIMIT", "MAX_NGRAM", "MAX_PAUSE", "MIN_NGRAM", "DraftPace", "PromptLookup"]

MAX_NGRAM = 4
"""Longest ending looked up: longer matches predict better, and four tokens rarely recur by
chance."""
MIN_NGRAM = 3
"""Shortest ending looked up: shorter ones (a space and a comma, "of the") recur everywhere
and mostly mispredict (open chat on the default model: a third of 2-token matches' drafts
accepted)."""
FIRST_LIMIT = 2
"""Tokens a sequence's first draft may have: a wrong draft costs a row each."""
MAX_PAUSE = 32
"""Most steps a sequence waits before drafting again after drafts rejected whole."""


class DraftPace:
    """How many tokens one sequence's next draft may have, after how its drafts did."""

    __slots__ = ("_limit", "_pause", "_wait")

    def __init__(self, limit: int) -> None:
        """Args:
        limit: the most tokens one draft may have (the first has at most
            :data:`FIRST_LIMIT`).
        """
        self._limit = min(limit, FIRST_LIMIT)  # grows with accepted drafts
        self._pause = 0  # steps to wait after the next draft rejected whole
        self._wait = 0  # steps left before drafting again

    def allow(self, k: int) -> int:
        """How many of ``k`` wanted tokens the next draft may have: at most :attr:`limit`, and
        none while paused (asking counts one step of the pause)."""
        if self._wait:
            self._wait -= 1
            return 0
        return max(0, min(k, self._limit))

    def record(self, drafted: int, accepted: int, most: int) -> None:
        """The outcome of a draft: ``accepted`` of ``drafted`` tokens; ``most`` is the
        configured bound. All accepted doubles the limit (up to ``most``); a rejection sets it
        to one more than were accepted. Less than half accepted costs more than it saves (a
        row of a small step costs about half a step) and pauses drafting, for twice as long
        as the last pause if that one was for the same reason."""
        if not drafted:
            return
        self._limit = min(most, 2 * self._limit) if accepted == drafted else accepted + 1
        if 2 * accepted >= drafted:
            self._pause = 0
        else:
            self._pause = min(MAX_PAUSE, max(1, 2 * self._pause))
            self._wait = self._pause

    @property
    def limit(self) -> int:
        """The most tokens the next draft may have."""
        return self._limit

    def __repr__(self) -> str:
        return f"DraftPace(limit={self._limit}, wait={self._wait})"


class PromptLookup:
    """One sequence's tokens, indexed by their n-grams, and the drafts they suggest."""

    __slots__ = ("_index", "pace", "tokens")

    def __init__(self, tokens: Iterable[int], *, limit: int) -> None:
        """Args:
        tokens: the sequence so far (its prompt).
        limit: the most tokens one draft may have (the first has at most
            :data:`FIRST_LIMIT`).
        """
        self.tokens: list[int] = []
        # n -> the n-gram ending at position p -> p, for every p before the last token (the
        # sequence's own ending is not a match for itself).
        self._index: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(MIN_NGRAM, MAX_NGRAM + 1)
        }
        self.pace = DraftPace(limit)
        """How long its drafts may be, after how they did."""
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Tokens appended to the sequence (accepted output)."""
        for token in tokens:
            end = len(self.tokens) - 1  # the previous last token becomes a match position
            if end >= 0:
                for n, index in self._index.items():
                    if end + 1 >= n:
                        index[tuple(self.tokens[end + 1 - n : end + 1])] = end
            self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to ``min(k, limit)`` tokens that followed the longest recent ending of the
        sequence found earlier in it; empty when there is none (or while paused)."""
        k = self.pace.allow(k)
        if k <= 0:
            return []
        tokens = self.tokens
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(tokens) <= n:
                continue
            end = self._index[n].get(tuple(tokens[-n:]))
            if end is not None:
                # Copied as LZ77 copies: a match that ends close to the sequence's end runs
                # on into the tokens drafted so far, so a loop of period p drafts k tokens,
                # not p.
                draft: list[int] = []
                for at in range(end + 1, end + 1 + k):
                    draft.append(tokens[at] if at < len(tokens) else draft[at - len(tokens)])
                return draft
        return []

    def record(self, drafted: int, accepted: int, most: int) -> None:
        """The outcome of a draft (see :meth:`DraftPace.record`)."""
        self.pace.record(drafted, accepted, most)

    @property
    def limit(self) -> int:
        """The most tokens the next draft may have."""
        return self.pace.limit

    def __repr__(self) -> str:
        return f"PromptLookup(tokens={len(self.tokens)}, {self.pace!r})"
