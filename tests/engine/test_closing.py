"""Budget-aware closing on the tiny model: a constraint that can be completed within the
tokens left is completed, and the request ends with ``stop``; far from the budget nothing
changes; a closing path completes its constraint from wherever the matcher stands."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from zigllama_batch import (
    FinishReason,
    GenerationConfig,
    LLaMAModel,
    StructuredOutput,
    TextGenerator,
    Tokenizer,
)
from zigllama_batch.engine.closing import END, MARGIN, closing_path
from zigllama_batch.engine.grammar import GrammarCompiler

Tiny = tuple[LLaMAModel, Tokenizer]

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "n": {"type": "integer"},
    },
    "required": ["name", "tags"],
}
SHAPES: list[tuple[StructuredOutput, dict[str, Any] | None]] = [
    (StructuredOutput.json_object(), {"type": "object"}),
    (StructuredOutput.json_schema(RECORD), RECORD),  # {"name":"","tags":[]} takes 21 tokens
    (StructuredOutput.regex(r"[a-z]+(-[0-9]{2})+"), None),
]


def sampled(seed: int, structured: StructuredOutput, max_tokens: int) -> GenerationConfig:
    """Free sampling: the tiny model is random and rambles inside strings."""
    return GenerationConfig(
        temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_tokens=max_tokens,
        structured=structured,
    )  # fmt: skip


def check(text: str, structured: StructuredOutput, schema: dict[str, Any] | None) -> None:
    """``text`` is whole under ``structured``."""
    if schema is None:
        assert re.fullmatch(structured.spec, text), text
    else:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_tokens", [22, 30])
@pytest.mark.parametrize(("structured", "schema"), SHAPES)
def test_a_small_budget_ends_with_whole_output_and_stop(
    tiny: Tiny,
    structured: StructuredOutput,
    schema: dict[str, Any] | None,
    max_tokens: int,
    seed: int,
) -> None:
    """Where a completion fits in max_tokens, the output is completed within it: it parses,
    validates and ends with stop."""
    result = TextGenerator(*tiny).generate("hello", sampled(seed, structured, max_tokens))
    assert result.finish_reason == FinishReason.STOP, result.text
    assert result.completion_tokens <= max_tokens
    check(result.text, structured, schema)


def test_the_end_of_the_context_is_a_budget_too(tiny: Tiny) -> None:
    """With max_tokens beyond the context, the output is completed before the context ends."""
    model, tok = tiny
    prompt = tok.encode("hello")
    gen = TextGenerator(model, tok, max_context=len(prompt) + 26)
    structured = StructuredOutput.json_schema(RECORD)
    result = gen.generate(prompt, sampled(0, structured, max_tokens=1000))
    assert result.finish_reason == FinishReason.STOP, result.text
    check(result.text, structured, RECORD)


EARLY = [  # constraints the tiny model completes well before 60 tokens
    StructuredOutput.regex(r"[a-c]{2,5}-\d{2}"),
    StructuredOutput.choice(["red", "green", "a shade of blue"]),
    StructuredOutput.json_schema(
        {
            "type": "object",
            "properties": {
                "kind": {"enum": ["cat", "dog"]},
                "legs": {"maximum": 8, "minimum": 0, "type": "integer"},
            },
            "required": ["kind", "legs"],
        }
    ),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("structured", EARLY)
def test_steering_changes_nothing_far_from_the_budget_and_closes_near_it(
    tiny: Tiny, structured: StructuredOutput, seed: int
) -> None:
    """A request that ends well before its budget samples exactly the tokens it samples with
    closing off; with a budget one token above the shortest completion it still ends whole."""
    runs = []
    for on in (False, True):
        gen = TextGenerator(*tiny)
        gen.engine.grammars.close_within_budget = on
        runs.append(gen.generate("hello", sampled(seed, structured, max_tokens=60)))
    assert runs[0].finish_reason == FinishReason.STOP
    assert runs[0].completion_tokens < 60 - 2 * MARGIN
    assert runs[1].token_ids == runs[0].token_ids
    model, tok = tiny
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    shortest = closing_path(compiler.hook(structured).matcher, compiler.closing_tables(), -1, 60)
    assert shortest is not None
    tight = TextGenerator(*tiny).generate("hello", sampled(seed, structured, len(shortest) + 1))
    assert tight.finish_reason == FinishReason.STOP, tight.text
    assert (
        GrammarCompiler(tok, model.config.vocab_size)
        .hook(structured)
        .matcher.consume_tokens(list(tight.token_ids))
    )


@pytest.mark.parametrize("seed", range(4))
def test_a_closing_path_completes_the_constraint_from_any_point(tiny: Tiny, seed: int) -> None:
    """At every point of a sampled JSON answer, the closing path is accepted by the
    constraint and leaves it complete."""
    model, tok = tiny
    structured = StructuredOutput.json_schema(RECORD)
    tokens = TextGenerator(*tiny).generate("hello", sampled(seed, structured, 40)).token_ids
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    tables = compiler.closing_tables()
    matcher = compiler.hook(structured).matcher
    last = -1
    for t in tokens:
        path = closing_path(matcher, tables, last, 200)
        assert path is not None
        m = matcher.deep_copy()
        assert m.consume_tokens([p for p in path if p != END])
        assert m.is_stopped() or (path[-1] == END and m.is_accepting())
        assert matcher.consume_token(t)
        last = t
