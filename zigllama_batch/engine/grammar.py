"""Structured output on llguidance: constraints compiled against the model's tokenizer, and the
per-sequence hook that masks what they do not allow.

Inside: :class:`GrammarCompiler` (turns a :class:`~zigllama_batch.StructuredOutput` into an
llguidance matcher, once per distinct constraint: 32 requests with one schema compile once,
and each gets a copy of the compiled matcher at its start state) and :class:`GrammarHook` (a
:class:`~zigllama_batch.engine.sampler.LogitsHook`: before each choice it fills the sequence's
packed bitmask of allowed tokens and sets every other logit to -inf; after it, it advances the
matcher with the chosen token). Rows without a constraint never meet this module.

JSON comes out compact (``","`` and ``":"`` with no whitespace between tokens): a small model
allowed free whitespace can fill its budget with newlines. A matcher that fails mid-generation
(a resource limit, a token it cannot take) reports an error that ends only its own request.

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
import threading
from collections import OrderedDict
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
"""Compiled constraints kept (least recently used dropped first): a server sees few distinct
schemas, each ~1 ms to compile and tens of KB to keep."""

_JSON_OPTIONS: Any = {"whitespace_flexible": False}
"""Compact JSON: separators without spaces, no whitespace between tokens."""


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary; safe to call from any thread."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        *,
        jump_forward: bool = True,
        close_within_budget: bool = True,
    ) -> None:
        """Args:
        tokenizer: the model's tokenizer (its vocabulary is what the masks cover).
        vocab_size: rows of the model's logits (may exceed the tokenizer's vocabulary).
        jump_forward: feed the tokens a constraint forces without sampling them.
        close_within_budget: near the end of a sequence's budget, allow only tokens after
            which its constraint can still be completed (see :mod:`.closing`).
        """
        self._source = tokenizer
        self.vocab_size = vocab_size
        self.jump_forward = jump_forward
        self.close_within_budget = close_within_budget
        self._tokenizer: llg.LLTokenizer | None = None
        self._closing: ClosingTables | None = None
        self._compiled: OrderedDict[StructuredOutput, llg.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, structured: StructuredOutput) -> None:
        """Compile ``structured`` now (cached), so a bad one fails before the request queues.

        Raises:
            InvalidRequest: the schema, pattern or grammar does not compile, uses a feature
                llguidance does not support, or exceeds its compile limits.
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
        with self._lock:
            matcher = self._compiled.get(structured)
            if matcher is not None:
                self._compiled.move_to_end(structured)
                return matcher
        matcher = llg.LLMatcher(self._llg_tokenizer(), _grammar(structured), log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"{structured.kind}: {matcher.get_error()}")
        with self._lock:
            self._compiled[structured] = matcher
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

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
            self.error = self.matcher.get_error()
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
            self.error = self.matcher.get_error() or f"token {token_id} breaks the constraint"
            return ()
        forced: tuple[int, ...] = ()
        if self._jump and not self.matcher.is_stopped():
            forced = tuple(self.matcher.compute_ff_tokens()[:MAX_FORCED])
            if forced and not self.matcher.consume_tokens(list(forced)):
                self.error = self.matcher.get_error() or "the forced tokens break the constraint"
                return ()
        if self._closer is not None:
            self._closer.advance(token_id, forced)
        return forced

    @property
    def finished(self) -> bool:
        """True once the constraint is complete and allows nothing more."""
        return self.error is None and self.matcher.is_stopped()
