"""Constraints on the shape of a generation's text: JSON (a schema, or any object), a regular
expression, one of fixed choices, or a context-free grammar.

:class:`StructuredOutput` is what a caller puts on
:class:`~zigllama_batch.GenerationConfig` (``structured=StructuredOutput.json_schema(...)``).
It only records and checks what was asked; the engine compiles it with llguidance (the library
behind Guidance, also used by llama.cpp, vLLM and SGLang) and masks every token the constraint
does not allow, so the text can only be one the constraint accepts. Compile errors (an invalid
schema, an unsupported keyword, a grammar that does not parse, one too large or too slow to
compile, or one llguidance's parser cannot follow past its first tokens) are
:class:`~zigllama_batch.InvalidRequest` s, raised before the request runs.

Left out: JSON schema ``format`` values llguidance does not know, and ``%llguidance``-specific
grammar features beyond its Lark syntax.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidRequest

__all__ = ["StructuredOutput"]

StructuredKind = Literal["json_schema", "regex", "choice", "grammar"]

MAX_SPEC_CHARS = 256 * 1024
"""Longest schema, pattern or grammar text accepted: far beyond any real schema. What it
compiles to is bounded apart, in size and in time (``engine.grammar``)."""


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What a generation's text must look like. Build one with the class methods."""

    kind: StructuredKind
    """``json_schema`` (also for any JSON object), ``regex``, ``choice`` or ``grammar``."""
    spec: str
    """The constraint as text: a JSON schema (serialised), a pattern, a JSON list of choices,
    or a Lark or GBNF grammar. Equal specs share one compiled grammar."""

    def __post_init__(self) -> None:
        if self.kind not in ("json_schema", "regex", "choice", "grammar"):
            raise InvalidRequest(f"structured: unknown kind {self.kind!r}")
        if not isinstance(self.spec, str):
            raise InvalidRequest(f"structured: the spec must be text, got {type(self.spec)}")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequest(
                f"structured: the {self.kind} is {len(self.spec)} characters long; at most "
                f"{MAX_SPEC_CHARS} are accepted"
            )

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | bool | str) -> StructuredOutput:
        """JSON that validates against ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"json_schema: not valid JSON: {exc}") from None
        if not isinstance(schema, Mapping | bool):
            raise InvalidRequest(
                f"json_schema: a schema is a JSON object (or true/false), got {schema!r:.80}"
            )
        try:
            text = json.dumps(schema, allow_nan=False)  # key order kept: it is the output order
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"json_schema: not serialisable as JSON: {exc}") from None
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> StructuredOutput:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        """Text matching ``pattern`` in full (Rust ``regex`` syntax, as llguidance reads it)."""
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequest(f"regex: must be a non-empty str, got {pattern!r:.80}")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutput:
        """Exactly one of ``options``."""
        if isinstance(options, str) or not isinstance(options, Sequence) or not options:
            raise InvalidRequest(f"choice: must be a non-empty list of str, got {options!r:.80}")
        if not all(isinstance(o, str) and o for o in options):
            raise InvalidRequest("choice: every option must be a non-empty str")
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def grammar(cls, text: str) -> StructuredOutput:
        """Text the context-free grammar ``text`` derives: Lark syntax as llguidance reads it
        (``start: ...``), or llama.cpp's GBNF (``root ::= ...``), converted."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest(f"grammar: must be a non-empty str, got {text!r:.80}")
        return cls("grammar", text)

    def __repr__(self) -> str:
        spec = self.spec if len(self.spec) <= 60 else self.spec[:57] + "..."
        return f"StructuredOutput({self.kind}, {spec!r})"
