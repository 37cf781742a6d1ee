"""Objects closed by default: a JSON schema's object that lists its keys and does not say
whether others are allowed takes no other key, at every level; an explicit
``additionalProperties`` is honoured; objects merged from several schemas keep their keys."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import numpy as np
import pytest
from numpy.typing import NDArray

from zigllama_batch import (
    FinishReason,
    GenerationConfig,
    LLaMAModel,
    StructuredOutput,
    TextGenerator,
    Tokenizer,
)
from zigllama_batch.engine.grammar import GrammarCompiler
from zigllama_batch.engine.json_schema import close_objects

Tiny = tuple[LLaMAModel, Tokenizer]

POINT = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


def test_objects_that_list_their_keys_are_closed_at_every_level() -> None:
    """Properties, array items, prefixItems, $defs, anyOf alternatives and patternProperties
    objects all get additionalProperties false; the schema is otherwise unchanged."""
    schema = {
        "$defs": {"point": copy.deepcopy(POINT)},
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/point"},
            "path": {"type": "array", "items": copy.deepcopy(POINT)},
            "pair": {"type": "array", "prefixItems": [copy.deepcopy(POINT)]},
            "either": {"anyOf": [copy.deepcopy(POINT), {"type": "null"}]},
            "tags": {"type": "object", "patternProperties": {"^t": {"type": "string"}}},
            "properties": copy.deepcopy(POINT),  # a key named like a keyword is just a key
        },
    }
    closed = close_objects(copy.deepcopy(schema))
    assert closed["additionalProperties"] is False
    for where in (
        closed["$defs"]["point"],
        closed["properties"]["path"]["items"],
        closed["properties"]["pair"]["prefixItems"][0],
        closed["properties"]["either"]["anyOf"][0],
        closed["properties"]["tags"],
        closed["properties"]["properties"],
    ):
        assert where.pop("additionalProperties") is False
    closed.pop("additionalProperties")
    assert closed == schema


@pytest.mark.parametrize(
    "schema",
    [
        {**POINT, "additionalProperties": True},
        {**POINT, "additionalProperties": {"type": "string"}},
        {"type": "object"},  # any object (JSON mode)
        {"type": "object", "required": ["x"]},
        {"allOf": [POINT, {"properties": {"y": {"type": "integer"}}}]},
        {"$defs": {"p": POINT}, "$ref": "#/$defs/p", "properties": {"y": {"type": "integer"}}},
    ],
)
def test_explicit_choices_bare_objects_and_merged_objects_are_left_open(
    schema: dict[str, Any],
) -> None:
    """An explicit additionalProperties, an object without listed keys, and the parts of an
    object merged with allOf or beside a $ref stay as written."""
    assert close_objects(copy.deepcopy(schema)) == schema


def hook_after(tiny: Tiny, schema: dict[str, Any], text: str) -> NDArray[np.float32]:
    """The logits row a hook under ``schema`` leaves after ``text``: -inf where masked."""
    model, tok = tiny
    hook = GrammarCompiler(tok, model.config.vocab_size).hook(StructuredOutput.json_schema(schema))
    assert hook.matcher.consume_tokens(tok.encode(text))
    logits = np.zeros(model.config.vocab_size, np.float32)
    hook.adjust(logits)
    return logits


@pytest.mark.parametrize(("additional", "allowed"), [(None, False), (True, True)])
def test_extra_keys_are_masked_unless_the_schema_allows_them(
    tiny: Tiny, additional: bool | None, allowed: bool
) -> None:
    """After the last listed key's value, a comma (another key) is masked when the schema says
    nothing, and allowed when it says additionalProperties true."""
    _, tok = tiny
    schema = dict(POINT) if additional is None else {**POINT, "additionalProperties": additional}
    logits = hook_after(tiny, schema, '{"x":1')
    assert bool(np.isfinite(logits[tok.encode(",")[0]])) is allowed
    assert np.isfinite(logits[tok.encode("}")[0]])


def test_an_object_merged_with_all_of_accepts_the_keys_of_every_part(tiny: Tiny) -> None:
    """allOf parts are not closed, so the merged object compiles and takes both parts' keys."""
    schema = {"allOf": [POINT, {"properties": {"y": {"type": "integer"}}, "required": ["y"]}]}
    logits = hook_after(tiny, schema, '{"x":1,"y":2')
    assert np.isfinite(logits[tiny[1].encode("}")[0]])


FREE = {  # no additionalProperties anywhere: closed by default
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "tags": {
            "type": "array",
            "items": {"type": "object", "properties": {"t": {"enum": ["a", "b"]}}},
            "maxItems": 2,
        },
    },
    "required": ["name", "tags"],
}


@pytest.mark.parametrize("seed", range(4))
def test_sampled_json_has_only_the_listed_keys(tiny: Tiny, seed: int) -> None:
    """What a random model samples under a schema that does not mention additionalProperties
    validates against the same schema with every object closed."""
    config = GenerationConfig(
        temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_tokens=200,
        structured=StructuredOutput.json_schema(FREE),
    )  # fmt: skip
    result = TextGenerator(*tiny).generate("hello", config)
    assert result.finish_reason == FinishReason.STOP, result.text
    strict = copy.deepcopy(FREE)
    strict["additionalProperties"] = False
    strict["properties"]["tags"]["items"]["additionalProperties"] = False
    jsonschema.validate(json.loads(result.text), strict)
