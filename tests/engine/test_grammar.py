"""Structured output on the tiny model: whatever a random model samples under a constraint is
text the constraint accepts, the request ends with ``stop`` when the constraint is complete,
bad constraints are refused with a clear error, and each distinct constraint compiles once."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import numpy as np
import pytest

from zigllama_batch import (
    FinishReason,
    GenerationConfig,
    InvalidRequest,
    LLaMAModel,
    StructuredOutput,
    TextGenerator,
    Tokenizer,
)
from zigllama_batch.engine.grammar import GrammarCompiler

Tiny = tuple[LLaMAModel, Tokenizer]

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "tame": {"type": "boolean"},
        "tags": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-c]{1,3}$"},
            "minItems": 1,
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99}},
            "required": ["age"],
            "additionalProperties": False,
        },
    },
    "required": ["kind", "legs", "tags"],
    "additionalProperties": False,
}


def sampled(seed: int, structured: StructuredOutput, max_tokens: int = 200) -> GenerationConfig:
    """Free sampling (the tiny model is random: it tries everything the mask leaves)."""
    return GenerationConfig(
        temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_tokens=max_tokens,
        structured=structured,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_every_sampled_json_validates_against_its_schema(tiny: Tiny, seed: int) -> None:
    """Nested objects, enums, bounded integers, patterned strings in a bounded array, optional
    fields, no extra keys: the text parses and validates, and ends with ``stop``."""
    result = TextGenerator(*tiny).generate(
        "hello", sampled(seed, StructuredOutput.json_schema(SCHEMA))
    )
    assert result.finish_reason == FinishReason.STOP, result.text
    jsonschema.validate(json.loads(result.text), SCHEMA)


@pytest.mark.parametrize("seed", range(4))
def test_regex_choice_and_grammar_outputs_match(tiny: Tiny, seed: int) -> None:
    """A regex is matched in full, a choice is one of its options, a Lark or GBNF grammar's
    language is respected."""
    gen = TextGenerator(*tiny)
    r = gen.generate("x", sampled(seed, StructuredOutput.regex(r"[a-c]{2,5}-\d{2}")))
    assert re.fullmatch(r"[a-c]{2,5}-\d{2}", r.text), r.text
    assert r.finish_reason == FinishReason.STOP
    options = ["cat", "dog", "a bird"]
    r = gen.generate("x", sampled(seed, StructuredOutput.choice(options)))
    assert r.text in options
    lark = 'start: item ("," item)*\nitem: "ab" | "cd"'
    r = gen.generate("x", sampled(seed, StructuredOutput.grammar(lark), max_tokens=400))
    assert re.fullmatch(r"(ab|cd)(,(ab|cd))*", r.text), r.text
    gbnf = 'root ::= "yes" | "no" | "maybe " [0-9]'
    r = gen.generate("x", sampled(seed, StructuredOutput.grammar(gbnf)))
    assert re.fullmatch(r"yes|no|maybe [0-9]", r.text), r.text


def test_max_tokens_first_ends_with_length(tiny: Tiny) -> None:
    """A constraint cut short by ``max_tokens`` ends with ``length``, as OpenAI's does."""
    r = TextGenerator(*tiny).generate(
        "x", sampled(0, StructuredOutput.regex("[a-z]{40}"), max_tokens=3)
    )
    assert r.finish_reason == FinishReason.LENGTH
    assert r.completion_tokens == 3


def test_a_complete_constraint_stops_even_when_eos_is_ignored(tiny: Tiny) -> None:
    """Once the constraint allows nothing more the request ends, ``ignore_eos`` or not."""
    config = sampled(1, StructuredOutput.choice(["yes", "no"])).with_(ignore_eos=True)
    r = TextGenerator(*tiny).generate("x", config)
    assert r.text in ("yes", "no")
    assert r.finish_reason == FinishReason.STOP


@pytest.mark.parametrize(
    ("structured", "message"),
    [
        (StructuredOutput.json_schema({"type": "object", "if": {}}), r"json_schema: .*if"),
        (StructuredOutput.json_schema({"type": "frog"}), "json_schema: "),
        (StructuredOutput.json_schema({"type": "string", "format": "not-a-format"}), "format"),
        (StructuredOutput.regex("(unclosed"), "regex: "),
        (StructuredOutput.grammar("start: undefined_rule"), "grammar: "),
        (StructuredOutput.grammar("root ::= ("), "grammar: "),
    ],
)
def test_a_constraint_that_does_not_compile_is_an_invalid_request(
    tiny: Tiny, structured: StructuredOutput, message: str
) -> None:
    """Unsupported keywords, invalid schemas, patterns and grammars: InvalidRequest with
    llguidance's reason, before anything is generated."""
    model, tok = tiny
    with pytest.raises(InvalidRequest, match=message):
        GrammarCompiler(tok, model.config.vocab_size).check(structured)
    with pytest.raises(InvalidRequest, match=message):
        TextGenerator(model, tok).generate("x", GenerationConfig(structured=structured))


def test_each_distinct_constraint_compiles_once(tiny: Tiny) -> None:
    """Hooks for one constraint share its compiled grammar; each starts at the beginning."""
    model, tok = tiny
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    structured = StructuredOutput.choice(["cat", "dog"])
    first = compiler.hook(structured)
    first.accept(tok.encode("c")[0])
    second = compiler.hook(StructuredOutput.choice(["cat", "dog"]))
    assert len(compiler._compiled) == 1
    logits = np.zeros(model.config.vocab_size, np.float32)
    second.adjust(logits)  # the fresh hook still allows "d", which the first one no longer does
    assert np.isfinite(logits[tok.encode("d")[0]])


KEYS = {
    "type": "object",
    "properties": {f"property_number_{i}": {"enum": ["alpha", "beta"]} for i in range(8)},
    "required": [f"property_number_{i}" for i in range(8)],
    "additionalProperties": False,
}


def counting(gen: TextGenerator) -> list[int]:
    """Record the number of new tokens of every engine step ``gen`` runs."""
    sizes: list[int] = []
    real_step = gen.engine.step

    def step(items: Any) -> Any:
        sizes.append(sum(len(it.token_ids) for it in items))
        return real_step(items)

    gen.engine.step = step  # type: ignore[method-assign]
    return sizes


@pytest.mark.parametrize("seed", range(3))
def test_jump_forward_feeds_forced_tokens_in_one_step(tiny: Tiny, seed: int) -> None:
    """Fixed keys are forced: with jump-forward they come as chunks of several tokens, in
    fewer steps than sampling them one by one, and the output still validates."""
    config = sampled(seed, StructuredOutput.json_schema(KEYS), max_tokens=300)
    steps = {}
    for jump in (False, True):
        gen = TextGenerator(*tiny)
        gen.engine.grammars.jump_forward = jump
        sizes = counting(gen)
        result = gen.generate("x", config)
        jsonschema.validate(json.loads(result.text), KEYS)
        assert result.finish_reason == FinishReason.STOP
        steps[jump] = len(sizes)
        assert (max(sizes[1:]) > 1) is jump
    assert steps[True] < steps[False] / 2


def test_max_tokens_inside_forced_tokens_ends_with_length(tiny: Tiny) -> None:
    """The token budget counts forced tokens: the request stops at max_tokens exactly."""
    config = sampled(0, StructuredOutput.json_schema(KEYS), max_tokens=7)
    result = TextGenerator(*tiny).generate("x", config)
    assert result.finish_reason == FinishReason.LENGTH
    assert result.completion_tokens == 7


def test_requests_with_logprobs_sample_every_token(tiny: Tiny) -> None:
    """Forced tokens have no logprob, so a request that wants logprobs samples each token."""
    config = sampled(0, StructuredOutput.json_schema(KEYS), max_tokens=300).with_(logprobs=True)
    gen = TextGenerator(*tiny)
    sizes = counting(gen)
    result = gen.generate("x", config)
    assert result.logprobs is not None
    assert len(result.logprobs) == result.completion_tokens
    assert max(sizes[1:]) == 1


def test_stop_strings_still_cut_constrained_text(tiny: Tiny) -> None:
    """A stop string applies to constrained text as to free text: the text ends before it,
    with finish_reason stop, even though the constraint is not complete."""
    config = sampled(0, StructuredOutput.regex("abc(d|e)fgh"), max_tokens=40).with_(stop=("fg",))
    result = TextGenerator(*tiny).generate("x", config)
    assert result.text in ("abcd", "abce")
    assert result.finish_reason == FinishReason.STOP


def test_the_end_of_sequence_token_only_where_the_constraint_is_complete(tiny: Tiny) -> None:
    """EOS is masked until the constraint accepts: a regex with an optional tail may end at
    either place, never before the mandatory part."""
    model, tok = tiny
    hook = GrammarCompiler(tok, model.config.vocab_size).hook(StructuredOutput.regex("ab(cd)?"))
    eos = tok.eos_id
    logits = np.zeros(model.config.vocab_size, np.float32)
    hook.adjust(logits)
    assert logits[eos] == -np.inf  # nothing written yet
    for t in tok.encode("ab"):
        hook.accept(t)
    logits[:] = 0
    hook.adjust(logits)
    assert np.isfinite(logits[eos])  # "ab" is complete; "cd" may follow
    assert np.isfinite(logits[tok.encode("c")[0]])
