"""Structured output on the tiny model: whatever a random model samples under a constraint is
text the constraint accepts, the request ends with ``stop`` when the constraint is complete,
bad constraints are refused with a clear error, and each distinct constraint compiles once."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
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
from zigllama_batch.engine.grammar import MAX_ERROR_CHARS, GrammarCompiler

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


PARSER_LIMITS = {
    "8000_optional_properties": (
        StructuredOutput.json_schema(
            {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(8000)}}
        ),
        "grammar size",
    ),
    "3000_enum_properties": (
        StructuredOutput.json_schema(
            {"type": "object", "properties": {f"p{i}": {"enum": ["a", "b"]} for i in range(3000)}}
        ),
        "grammar size",
    ),
    "500_pattern_properties_open": (  # (closed, the same object can be followed)
        StructuredOutput.json_schema(
            {
                "type": "object",
                "properties": {
                    f"p{i}": {"type": "string", "pattern": "^[a-z]{3}[0-9]+$"} for i in range(500)
                },
                "additionalProperties": True,
            }
        ),
        "alternatives at one point",
    ),
    "20000_choices": (StructuredOutput.choice([f"opt{i}" for i in range(20_000)]), "grammar size"),
    "nested_repeats": (StructuredOutput.regex("((a{100}){100}){100}"), "too many expressions"),
    "lark_without_end": (StructuredOutput.grammar('start: "a" start'), "Too many items"),
    "gbnf_without_end": (StructuredOutput.grammar('root ::= "a" root'), "Too many items"),
    "regex_of_nothing": (StructuredOutput.regex("[^\\x00-\\U0010FFFF]"), "cannot be followed"),
}
"""Constraints llguidance accepts but cannot follow: each broke a parser limit on its first
tokens, and the reason each is refused for."""


@pytest.mark.parametrize("name", PARSER_LIMITS)
def test_a_constraint_that_breaks_a_parser_limit_is_refused_when_it_compiles(
    tiny: Tiny, name: str
) -> None:
    """A constraint that llguidance compiles but cannot follow past its first tokens is an
    InvalidRequest at compile time, with a one-line reason and none of llguidance's parser
    state or the grammar; the TextGenerator refuses it before generating."""
    model, tok = tiny
    structured, reason = PARSER_LIMITS[name]
    with pytest.raises(InvalidRequest, match=reason) as refused:
        GrammarCompiler(tok, model.config.vocab_size).check(structured)
    message = str(refused.value)
    assert message.startswith(f"{structured.kind}: ")
    assert "\n" not in message
    assert len(message) <= len(structured.kind) + 2 + MAX_ERROR_CHARS + len("cannot be followed: ")
    assert "<state>" not in message
    assert "non-verbose" not in message
    with pytest.raises(InvalidRequest, match=reason):
        TextGenerator(model, tok).generate("x", GenerationConfig(structured=structured))


def counted_builds(monkeypatch: pytest.MonkeyPatch) -> list[StructuredOutput]:
    """Record every constraint a GrammarCompiler really compiles (cache misses)."""
    built: list[StructuredOutput] = []
    real_build = GrammarCompiler._build

    def build(self: GrammarCompiler, structured: StructuredOutput) -> Any:
        built.append(structured)
        return real_build(self, structured)

    monkeypatch.setattr(GrammarCompiler, "_build", build)
    return built


SLOW = StructuredOutput.json_schema(
    {
        "type": "object",
        "patternProperties": {f"^p{i}_[a-z]+$": {"type": "integer"} for i in range(200)},
    }
)
"""Small, but ~1 s to compile (the overlaps of 200 key patterns)."""


def test_a_compile_past_its_time_is_refused_and_the_refusal_remembered(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A constraint that takes longer than timeout_s to compile is refused when the time is up,
    saying so; sent again, it is refused at once without compiling again."""
    model, tok = tiny
    built = counted_builds(monkeypatch)
    compiler = GrammarCompiler(tok, model.config.vocab_size, timeout_s=0.05)
    compiler.check(StructuredOutput.json_object())  # the tokenizer is built outside the limit
    for _ in range(2):
        with pytest.raises(InvalidRequest, match=r"json_schema: did not compile within 0.05 s"):
            compiler.check(SLOW)
    assert built.count(SLOW) == 1


def test_a_refused_constraint_is_not_compiled_again(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A constraint refused once (it does not compile, or cannot be followed) is refused again
    from the cache: the same bad schema sent many times costs one compile."""
    model, tok = tiny
    built = counted_builds(monkeypatch)
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    for structured, reason in [PARSER_LIMITS["lark_without_end"], (BAD_IF, "if")] * 3:
        with pytest.raises(InvalidRequest, match=reason):
            compiler.check(structured)
    assert len(built) == 2


BAD_IF = StructuredOutput.json_schema({"type": "object", "if": {}})


def test_concurrent_requests_for_one_new_constraint_share_one_compile(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many threads checking the same new constraint at once wait for one compile, and all get
    its outcome."""
    model, tok = tiny
    built = counted_builds(monkeypatch)
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    compiler.check(StructuredOutput.json_object())  # the tokenizer first, then the race
    wide = StructuredOutput.json_schema(
        {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(300)}}
    )
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: compiler.check(wide), range(8)))
    assert built.count(wide) == 1


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
