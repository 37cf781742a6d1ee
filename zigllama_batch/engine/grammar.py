"""Structured output on llguidance: constraints compiled against the model's tokenizer, and the
per-sequence hook that masks what they do not allow.

Inside: :class:`GrammarCompiler` (turns a :class:`~zigllama_batch.StructuredOutput` into an
llguidance matcher, once per distinct constraint: 32 requests with one schema compile once,
and each gets a copy of the compiled matcher at its start state) and :class:`GrammarHook` (a
:class:`~zigllama_batch.engine.sampler.LogitsHook`: before each choice it fills the sequence's
packed bitmask of allowed tokens and sets every other logit to -inf; after it, it advances the
matcher with the chosen token). Rows without a constraint never meet this module.

JSON comes out compact (``","`` and ``":"`` with no whitespace between tokens): a small model
allowed free whitespace can fill its budget with newlines.

Constraints that cannot be followed are refused when they compile, not when a request runs into
them: llguidance's parser has limits (2,000 alternatives at one point of the text, 50,000 parser
items per token, a budget of regex states), and a constraint that breaks one typically does so
within its first tokens (an object of thousands of optional properties at its ``{``, a grammar
that can never end as soon as its first token forces the rest). So compiling also walks
:data:`PROBE_TOKENS` tokens into the constraint (the forced ones, else the lowest allowed id
that is not end-of-sequence) and refuses it if llguidance reports an error on the way. What
still fails mid-generation ends only its own request. Errors are llguidance's first line
(never its parser state or the grammar), at most :data:`MAX_ERROR_CHARS` characters.

Compile cost is bounded by size (:data:`MAX_GRAMMAR_SYMBOLS`) and by time
(:data:`COMPILE_TIMEOUT_S`); a refusal is remembered like a compiled grammar, so the same
constraint sent again costs nothing. Concurrent requests with one new constraint share one
compile.

Jump-forward: where the constraint allows exactly one continuation for a while (the fixed keys
of a JSON object, say), the hook returns those tokens after the chosen one, and the sequence
feeds them all in its next step as one chunk instead of sampling them one step each (up to
:data:`MAX_FORCED` at a time; not for requests that want logprobs, which forced tokens do not
have). The forced tokens are llguidance's tokenization of the forced text, which may split it
differently from how the model would have.

Budget-aware closing: near the end of a sequence's budget (``max_tokens``, or the end of the
context), the hook also masks the tokens after which the constraint could no longer be
completed in the tokens left (:mod:`.closing`), so that output that can be whole is. JSON
schemas are read with objects closed to unlisted keys by default (:mod:`.json_schema`).

Left out: masks of many rows computed in parallel (llguidance's executor): at ~20 us a row the
mask is not where a step's time goes.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

import llguidance as llg
import numpy as np
from numpy.typing import NDArray

from ..errors import InvalidRequest
from ..structured import StructuredOutput
from .closing import BudgetCloser, ClosingTables
from .json_schema import close_objects
from .tokenizer import Tokenizer

__all__ = ["GrammarCompiler", "GrammarHook"]

MAX_FORCED = 16
"""Most forced tokens fed in one step: bounds how far a step can exceed its token budget."""

MAX_CACHED_GRAMMARS = 256
"""Compiled constraints kept, refused ones included (least recently used dropped first): a
server sees few distinct schemas, each ~1 ms to compile and tens of KB to keep."""

MAX_GRAMMAR_SYMBOLS = 20_000
"""Most symbols llguidance may build a constraint's grammar from (its own default: 500,000).
Compile time grows faster than the size: measured on the default model, an object of 2,400
optional properties (19,000 symbols) compiles in 0.5 s; one of 8,000 took 4.6 s and is now
refused in 0.05 s. Past ~500 optional properties an object cannot be followed anyway (each
makes four of the 2,000 alternatives the parser allows at one point)."""

COMPILE_TIMEOUT_S = 5.0
"""Longest a constraint may take to compile; past it the request is refused and the constraint
remembered as refused. Size does not bound every shape (100 ``patternProperties`` compile in
0.06 s, 200 in 1 s, 300 in 2.5 s), and llguidance's compile cannot be interrupted: it runs on
to its end in its own thread, and its result is dropped."""

PROBE_TOKENS = 8
"""Tokens walked into a new constraint when it compiles (see the module docstring): enough to
pass the ``{`` of an object or the forced start of a grammar; ~1 ms for a typical one."""

MAX_ERROR_CHARS = 200
"""Longest llguidance error shown to a caller."""

_LIMITS = llg.LLParserLimits(max_grammar_size=MAX_GRAMMAR_SYMBOLS, verbose_errors=False)
"""llguidance's limits for every matcher: its defaults, but a smaller grammar, and errors
without the parser's state and the grammar in them."""

_JSON_OPTIONS: Any = {"whitespace_flexible": False}
"""Compact JSON: separators without spaces, no whitespace between tokens."""


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary; safe to call from any thread.

    A compile runs in a thread of its own while the caller waits for it, at most
    ``timeout_s``; call from a worker thread, not an event loop.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        *,
        jump_forward: bool = True,
        timeout_s: float = COMPILE_TIMEOUT_S,
        close_within_budget: bool = True,
    ) -> None:
        """Args:
        tokenizer: the model's tokenizer (its vocabulary is what the masks cover).
        vocab_size: rows of the model's logits (may exceed the tokenizer's vocabulary).
        jump_forward: feed the tokens a constraint forces without sampling them.
        timeout_s: longest a constraint may take to compile before it is refused.
        close_within_budget: near the end of a sequence's budget, allow only tokens after
            which its constraint can still be completed (see :mod:`.closing`).
        """
        self._source = tokenizer
        self.vocab_size = vocab_size
        self.jump_forward = jump_forward
        self.timeout_s = timeout_s
        self.close_within_budget = close_within_budget
        self._tokenizer: llg.LLTokenizer | None = None
        self._closing: ClosingTables | None = None
        # A compiled matcher, or why the constraint was refused.
        self._compiled: OrderedDict[StructuredOutput, llg.LLMatcher | str] = OrderedDict()
        self._compiling: dict[StructuredOutput, Future[llg.LLMatcher | str]] = {}
        self._lock = threading.Lock()

    def check(self, structured: StructuredOutput) -> None:
        """Compile ``structured`` now (cached), so a bad one fails before the request queues.

        Raises:
            InvalidRequest: the schema, pattern or grammar does not compile, uses a feature
                llguidance does not support, exceeds its size or time limit, or breaks one of
                llguidance's parser limits within its first tokens.
        """
        self._prototype(structured)

    def hook(
        self, structured: StructuredOutput, *, jump_forward: bool = True, budget: int | None = None
    ) -> GrammarHook:
        """A fresh hook for one sequence under ``structured`` (compiled on first use); it
        forces tokens when both ``jump_forward`` and the compiler's setting allow it, and
        completes the constraint within ``budget`` tokens (the most the sequence may generate)
        where it can, unless the compiler's ``close_within_budget`` is off.

        Raises:
            InvalidRequest: as :meth:`check`.
        """
        matcher = self._prototype(structured).deep_copy()
        closer = (
            BudgetCloser(self.closing_tables, budget)
            if budget is not None and self.close_within_budget
            else None
        )
        return GrammarHook(matcher, self.vocab_size, jump_forward and self.jump_forward, closer)

    def _prototype(self, structured: StructuredOutput) -> llg.LLMatcher:
        """The compiled matcher at its start state: cached, or compiled now (sharing a compile
        already under way for the same constraint)."""
        with self._lock:
            known = self._compiled.get(structured)
            if known is not None:
                self._compiled.move_to_end(structured)
            else:
                pending = self._compiling.get(structured) or self._start(structured)
        if known is None:
            known = self._wait(structured, pending)
        if isinstance(known, str):
            raise InvalidRequest(known)
        return known

    def _start(self, structured: StructuredOutput) -> Future[llg.LLMatcher | str]:
        """Start compiling ``structured`` in a thread of its own (the lock is held)."""
        pending: Future[llg.LLMatcher | str] = Future()
        self._compiling[structured] = pending
        threading.Thread(
            target=self._compile,
            args=(structured, pending),
            name="zigllama-grammar",
            daemon=True,  # a compile past its time runs on, but never holds up exit
        ).start()
        return pending

    def _wait(
        self, structured: StructuredOutput, pending: Future[llg.LLMatcher | str]
    ) -> llg.LLMatcher | str:
        """The outcome of a compile under way, or a refusal once ``timeout_s`` has passed."""
        try:
            return pending.result(timeout=self.timeout_s)
        except TimeoutError:
            refusal = (
                f"{structured.kind}: did not compile within {self.timeout_s:g} s; make it "
                "smaller (fewer properties, alternatives or patterns)"
            )
            self._remember(structured, refusal)
            return refusal

    def _compile(self, structured: StructuredOutput, done: Future[llg.LLMatcher | str]) -> None:
        """Compile in this thread and hand the outcome to every waiter; remember it unless the
        constraint was refused meanwhile (it took too long)."""
        try:
            outcome = self._build(structured)
        except BaseException as exc:  # a bug, not the constraint: not remembered
            with self._lock:
                del self._compiling[structured]
            done.set_exception(exc)
            return
        with self._lock:
            del self._compiling[structured]
            if structured not in self._compiled:
                self._remember(structured, outcome, locked=True)
        done.set_result(outcome)

    def _build(self, structured: StructuredOutput) -> llg.LLMatcher | str:
        """The matcher for ``structured``, or why it is refused."""
        try:
            grammar = _grammar(structured)
        except InvalidRequest as exc:
            return str(exc)
        matcher = llg.LLMatcher(self._llg_tokenizer(), grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            return f"{structured.kind}: {_brief(matcher.get_error())}"
        why = self._probe(matcher)
        if why is not None:
            return f"{structured.kind}: cannot be followed: {why}"
        return matcher

    def _probe(self, prototype: llg.LLMatcher) -> str | None:
        """Why the constraint fails within its first :data:`PROBE_TOKENS` tokens, or None:
        walks a copy of it, taking forced tokens, else the lowest allowed id that does not end
        the sequence."""
        hook = GrammarHook(prototype.deep_copy(), self.vocab_size)
        logits = np.zeros(self.vocab_size, np.float32)
        stops = np.array(sorted(self._source.stop_ids), np.int64)
        for _ in range(PROBE_TOKENS):
            if hook.finished:
                return None
            logits[:] = 0.0
            hook.adjust(logits)
            if hook.error is None:
                allowed = np.flatnonzero(logits == 0.0)
                going_on = allowed[~np.isin(allowed, stops)]
                hook.accept(int(going_on[0] if going_on.size else allowed[0]))
            if hook.error is not None:
                return hook.error
        return None

    def _remember(
        self, structured: StructuredOutput, outcome: llg.LLMatcher | str, *, locked: bool = False
    ) -> None:
        """Cache a compiled matcher or a refusal, dropping the least recently used past the
        bound (``locked``: the caller holds the lock)."""
        if not locked:
            with self._lock:
                self._remember(structured, outcome, locked=True)
            return
        self._compiled[structured] = outcome
        self._compiled.move_to_end(structured)
        while len(self._compiled) > MAX_CACHED_GRAMMARS:
            self._compiled.popitem(last=False)

    def closing_tables(self) -> ClosingTables:
        """The tokens closing paths are made of, for this tokenizer (built on first use, in
        the executor: ~20 ms for a 49k vocabulary)."""
        tokenizer = self._llg_tokenizer()
        with self._lock:
            if self._closing is None:
                self._closing = ClosingTables(tokenizer)
            return self._closing

    def _llg_tokenizer(self) -> llg.LLTokenizer:
        # Built on first use (~0.25 s for a 49k vocabulary), from the same tokenizers JSON the
        # model's Tokenizer runs on, so both agree on every token's bytes.
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llg.LLTokenizer(
                    self._source.hf_json(),
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self._source.stop_ids),
                )
            return self._tokenizer


def _brief(error: str) -> str:
    """The first line of an llguidance error, at most :data:`MAX_ERROR_CHARS` characters: the
    reason, without the parser state or the grammar that may follow it. The most common one,
    too many alternatives at one point, is said in terms a schema's author can act on."""
    line = error.strip().splitlines()[0].strip() if error.strip() else "unknown error"
    if (row := _ROW_LIMIT.search(line)) is not None:
        line = (
            f"{row[1]} alternatives at one point of the text, more than the {row[2]} the parser "
            "allows (an object with hundreds of optional properties, or a long enum or choice)"
        )
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


_ROW_LIMIT = re.compile(r"row has (\d+) items; max is (\d+)")
"""llguidance's message for too many alternatives at one point (its ``max_items_in_row``)."""


def _grammar(structured: StructuredOutput) -> str:
    """llguidance's grammar text for ``structured`` (a JSON schema's objects closed by default:
    see :mod:`~zigllama_batch.engine.json_schema`)."""
    try:
        if structured.kind == "json_schema":
            schema = close_objects(json.loads(structured.spec))
            return str(llg.LLMatcher.grammar_from_json_schema(schema, _JSON_OPTIONS))
        if structured.kind == "regex":
            return str(llg.LLMatcher.grammar_from_regex(structured.spec))
        if structured.kind == "choice":
            return str(llg.grammar_from("choice", structured.spec))
        return str(llg.grammar_from("grammar", structured.spec))  # Lark, or GBNF converted
    except ValueError as exc:
        raise InvalidRequest(f"{structured.kind}: {exc}") from None


class GrammarHook:
    """One sequence's constraint: masks its logits row, follows its chosen tokens."""

    __slots__ = ("_closer", "_jump", "_mask", "_vocab", "error", "matcher")

    def __init__(
        self,
        matcher: llg.LLMatcher,
        vocab_size: int,
        jump_forward: bool = True,
        closer: BudgetCloser | None = None,
    ) -> None:
        self.matcher = matcher
        self._vocab = vocab_size
        self._jump = jump_forward
        self._closer = closer
        self._mask: NDArray[np.int32] = np.zeros((vocab_size + 31) // 32, np.int32)
        self.error: str | None = None
        """Why the constraint cannot go on (then the request ends with an error), or None."""

    def adjust(self, logits: NDArray[np.float32]) -> None:
        """Set the logit of every token the constraint does not allow now to -inf."""
        if self.error is not None:
            return
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        if self.matcher.is_error():
            self.error = _brief(self.matcher.get_error())
            return
        allowed = np.unpackbits(self._mask.view(np.uint8), count=self._vocab, bitorder="little")
        if not allowed.any():
            self.error = "the constraint allows no token here"
            return
        logits[allowed == 0] = -np.inf
        if self._closer is not None:
            self._closer.steer(self.matcher, logits)

    def accept(self, token_id: int) -> tuple[int, ...]:
        """Advance the matcher past the chosen token, and past the tokens the constraint then
        forces (returned, to be fed without sampling)."""
        if self.error is not None:
            return ()
        if not self.matcher.consume_token(token_id):
            self.error = _brief(self.matcher.get_error() or f"token {token_id} breaks it")
            return ()
        forced: tuple[int, ...] = ()
        if self._jump and not self.matcher.is_stopped():
            forced = tuple(self.matcher.compute_ff_tokens()[:MAX_FORCED])
            if self.matcher.is_error() or (
                forced and not self.matcher.consume_tokens(list(forced))
            ):
                self.error = _brief(self.matcher.get_error() or "the forced tokens break it")
                return ()
        if self._closer is not None:
            self._closer.advance(token_id, forced)
        return forced

    @property
    def finished(self) -> bool:
        """True once the constraint is complete and allows nothing more."""
        return self.error is None and self.matcher.is_stopped()
