"""Budget-aware closing of constrained output: as a sequence nears the end of its token budget,
only tokens after which its constraint can still be completed in the tokens left are allowed,
so the text ends complete (``stop``) instead of cut off (``length``).

Inside: :class:`ClosingTables` (per tokenizer: the tokens closing paths are built from),
:func:`closing_path` and :class:`BudgetCloser` (one sequence's budget and steering).

A *closing path* is a short run of tokens that completes the constraint from where its matcher
stands, found greedily on a copy of the matcher: the tokens the constraint forces, if any; else
the first token of a fixed preference list that the constraint allows (closing quotes and
brackets, a comma, the shortest values ``""``, ``0``, ``null``..., then ``:`` and openers;
closing brackets come first right after an opening one, values first right after a ``:`` or
``,``, closing quotes first elsewhere, which is inside a string or after a value, where a comma
comes before values so that a number that could grow is ended); else the
first allowed single-byte token; and once the constraint may end but does not end by itself,
the end-of-sequence token. Its length bounds the tokens the constraint still needs.

The steering: the bound is first computed at the start, or once :data:`MAX_PATH` +
:data:`MARGIN` + :data:`MAX_WATCH` tokens are left (earlier, nothing is done). While the tokens
left exceed it by more than :data:`MARGIN` plus the longest bound seen (at most
:data:`MAX_WATCH`), nothing changes, and it is computed again when half of the difference is
spent (a handful of paths per sequence, none per token). Within that, each step checks the
model's :data:`CANDIDATES` best allowed tokens: a token fits if the current path still completes
the constraint after it (a token of string content, say; checked with llguidance's
``validate_tokens``, a few microseconds) while there is a token to spare, or if a new path,
walked on a copy of the matcher, fits the tokens left after it. Those that do not fit are
masked: a single token can open a structure (an item of an array of objects) that then has to be
completed. Within :data:`MARGIN`, every token is masked except those known to fit and the first
token of the current path; the path that goes with the chosen token is the next step's current
path, so the sequence always has one that fits. Greedy decoding thus keeps the model's own
choice while it fits, and closes at the last moment. When no path fits from the start, or the
constraint grows past the budget between two checks, the sequence runs as it would have and ends
with ``length``.

Left out: a search for the truly shortest path (the greedy path is an upper bound, usually a
token or two above it), paths through multi-byte tokens other than the closing ones, and a
guarantee for a token outside the best few that opens a long optional structure while the
tokens left are watched but not yet restricted (sampling may pick one; greedy decoding never).
"""

from __future__ import annotations

from collections.abc import Callable

import llguidance as llg
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CANDIDATES",
    "MARGIN",
    "MAX_PATH",
    "MAX_WATCH",
    "BudgetCloser",
    "ClosingTables",
    "closing_path",
]

MARGIN = 8
"""Spare tokens below which only tokens known to fit are allowed: room for the model's own
choices to be among them (string content fits while a token is spare), while a checked step
costs ~0.1-2 ms of the row's sampling (the top-k, a few checks, a walk for a candidate that
closes or opens structure)."""

CANDIDATES = 6
"""The model's best allowed tokens tried at a checked step: enough for sampled rows to keep
most of their probability, few enough that a step's checks stay under a millisecond or two."""

MAX_WATCH = 56
"""Most spare tokens, beyond :data:`MARGIN`, at which candidates are checked (the longest
closing path seen, up to this): one token can open a structure that then has to be completed
(a new item of an array of objects), rarely longer than the shortest completion of the
whole."""

MAX_PATH = 256
"""Longest closing path looked for: a constraint needing more is not steered. Paths are first
looked for when this plus the margins are left, so a request that ends further from its budget
than that pays nothing (a walk costs ~20 us a token of the path)."""

END = -1
"""Stands for the end-of-sequence token in a closing path."""

_NORMAL, _AFTER_OPEN, _AFTER_SEP = 0, 1, 2  # what the last token ended with: see the docstring


class ClosingTables:
    """The tokens closing paths are made of, for one tokenizer (built once, ~20 ms for a
    49k vocabulary)."""

    def __init__(self, tokenizer: llg.LLTokenizer) -> None:
        """Args:
        tokenizer: llguidance's tokenizer of the model (its size is that of the logits).
        """
        vocab_size = tokenizer.vocab_size
        texts = [tokenizer.decode_bytes([i]) for i in range(vocab_size)]
        closers = sorted(
            (i for i, t in enumerate(texts) if t and set(t) <= set(b'"}]')),
            key=lambda i: (-len(texts[i]), i),  # longest first: one token closes more
        )
        quotes = [i for i in closers if texts[i].startswith(b'"')]
        brackets = [i for i in closers if not texts[i].startswith(b'"')]
        values = self._single(tokenizer, ['""', "0", "null", "false", "true", "{}", "[]"])
        comma = self._single(tokenizer, [","])  # after a value: ends a number that could grow
        rest = self._single(tokenizer, [":", "[", "{"])
        self.orders: tuple[list[int], ...] = (
            quotes + brackets + comma + values + rest,  # _NORMAL
            brackets + values + quotes + comma + rest,  # _AFTER_OPEN
            values + brackets + quotes + comma + rest,  # _AFTER_SEP
        )
        """Per context, the tokens tried in turn at each step of a closing path."""
        self.context = np.zeros(vocab_size, np.uint8)
        """Per token, the context it leaves a closing path in."""
        for i, t in enumerate(texts):
            if t.endswith((b"{", b"[")):
                self.context[i] = _AFTER_OPEN
            elif t.endswith((b":", b",")):
                self.context[i] = _AFTER_SEP
        self.single_byte = np.array([i for i, t in enumerate(texts) if len(t) == 1], np.int64)
        """Tokens of one byte, the fallback when no preferred token is allowed."""
        self.eos_ids = sorted(tokenizer.eos_tokens)
        self.vocab_size = vocab_size

    @staticmethod
    def _single(tokenizer: llg.LLTokenizer, texts: list[str]) -> list[int]:
        """The ids of those ``texts`` that are one token each."""
        ids = [tokenizer.tokenize_str(t) for t in texts]
        return [i[0] for i in ids if len(i) == 1]


def closing_path(
    matcher: llg.LLMatcher, tables: ClosingTables, last: int, limit: int
) -> list[int] | None:
    """A run of tokens that completes ``matcher``'s constraint (:data:`END` for the
    end-of-sequence token), found on a copy; None if none of at most ``limit`` tokens was
    found. ``last``: the token consumed last (-1 at the start)."""
    m = matcher.deep_copy()
    path: list[int] = []
    mask = np.zeros((tables.vocab_size + 31) // 32, np.int32)
    while True:
        if m.is_stopped():
            return path if not m.is_error() else None
        if m.is_accepting():
            path.append(END)
        elif forced := m.compute_ff_tokens():
            m.consume_tokens(forced)
            path += forced
            last = forced[-1]
        else:
            order = tables.orders[tables.context[last] if last >= 0 else _NORMAL]
            last = next((t for t in order if m.try_consume_tokens([t])), -1)
            if last < 0:
                last = _first_allowed(m, tables, mask)
                if last < 0 or not m.consume_token(last):
                    return None
            path.append(last)
        if len(path) > limit:
            return None
        if path[-1] == END:
            return path


def _first_allowed(m: llg.LLMatcher, tables: ClosingTables, mask: NDArray[np.int32]) -> int:
    """The first single-byte token the matcher allows, else its first allowed token, else -1."""
    m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    allowed = np.unpackbits(mask.view(np.uint8), count=tables.vocab_size, bitorder="little")
    single = tables.single_byte[allowed[tables.single_byte] == 1]
    if len(single):
        return int(single[0])
    anywhere = np.flatnonzero(allowed)
    return int(anywhere[0]) if len(anywhere) else -1


class BudgetCloser:
    """One sequence's budget, and the steering that completes its constraint within it."""

    __slots__ = (
        "_check_at",
        "_last",
        "_options",
        "_plan",
        "_tables",
        "_watch",
        "budget",
        "gave_up",
        "spent",
    )

    def __init__(self, tables: Callable[[], ClosingTables], budget: int) -> None:
        """Args:
        tables: gives the tokenizer's closing tables (built on first use).
        budget: most tokens the sequence may generate (``max_tokens``, or less where the
            context ends first).
        """
        self._tables = tables
        self.budget = budget
        self.spent = 0
        """Tokens generated so far, forced ones included."""
        self.gave_up = False
        """No closing path fitted: the sequence is no longer steered."""
        # Tokens left at which the closing path is computed next. Not before a path as long as
        # any steered one would need watching: a longer path is not steered.
        self._check_at = min(budget, MAX_PATH + MARGIN + MAX_WATCH)
        self._plan: list[int] | None = None  # a closing path known to fit, from the last step
        self._options: dict[int, list[int]] | None = None  # allowed token -> a path after it
        self._watch = MARGIN  # spare tokens below which candidates are checked
        self._last = -1  # the token consumed last (-1: none yet)

    def steer(self, matcher: llg.LLMatcher, logits: NDArray[np.float32]) -> None:
        """Mask, in ``logits`` (already masked by the constraint), the tokens after which the
        constraint could not be completed in the tokens left."""
        left = self.budget - self.spent  # this token included
        if self.gave_up or left > self._check_at:
            return
        tables = self._tables()
        path = self._plan
        if path is None:
            path = closing_path(matcher, tables, self._last, min(left, MAX_PATH))
        if not path:  # none fits (or the constraint is already complete)
            self.gave_up = path is None
            return
        slack = left - len(path)
        self._watch = max(self._watch, MARGIN + min(len(path), MAX_WATCH))
        if slack > self._watch:
            self._check_at = left - max(1, (slack - self._watch) // 2)
            return
        self._options, refused = _options(matcher, tables, logits, path, left)
        if slack > MARGIN:  # watching: only the candidates seen not to fit are masked
            logits[refused] = -np.inf
            return
        keep = list(self._options)
        kept = logits[keep]
        logits[:] = -np.inf
        logits[keep] = kept

    def advance(self, token_id: int, forced: tuple[int, ...]) -> None:
        """Account for the token chosen and the tokens the constraint forced after it."""
        self.spent += 1 + len(forced)
        self._last = forced[-1] if forced else token_id
        plan = None if self._options is None else self._options.get(token_id)
        self._options = None
        n = len(forced)
        self._plan = plan[n:] if plan is not None and plan[:n] == list(forced) else None


def _options(
    matcher: llg.LLMatcher,
    tables: ClosingTables,
    logits: NDArray[np.float32],
    path: list[int],
    left: int,
) -> tuple[dict[int, list[int]], list[int]]:
    """The tokens known to fit, each with a closing path after it that fits the ``left - 1``
    tokens then left: the first of ``path`` (the end-of-sequence tokens if it is
    :data:`END`), and those of the model's best allowed tokens after which ``path`` itself
    still completes the constraint (while there is a token to spare) or a new closing path
    fits. And those of the best tokens that do not fit."""
    rest = path[1:]
    options = dict.fromkeys(tables.eos_ids, rest) if path[0] == END else {path[0]: rest}
    refused = []
    # Checked with the end-of-sequence token after it: a path is whole if that is allowed.
    whole = [t for t in path if t != END] + tables.eos_ids[:1]
    for t in _best(logits, CANDIDATES):
        if t in options:
            continue
        if len(path) < left and matcher.validate_tokens([t, *whole]) == 1 + len(whole):
            options[t] = path
            continue
        m = matcher.deep_copy()
        if m.consume_token(t) and (after := closing_path(m, tables, t, left - 1)) is not None:
            options[t] = after
        else:
            refused.append(t)
    return options, refused


def _best(logits: NDArray[np.float32], k: int) -> list[int]:
    """The ids of the ``k`` largest finite logits, best first (ties: lowest id first); the
    row is left as it was. k argmax passes: ~10x faster than ``argpartition`` over 49k."""
    best: list[int] = []
    values: list[float] = []
    for _ in range(k):
        i = int(logits.argmax())
        if logits[i] == -np.inf:
            break
        best.append(i)
        values.append(float(logits[i]))
        logits[i] = -np.inf
    logits[best] = values
    return best
