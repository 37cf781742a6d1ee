"""StructuredOutput: what a caller may ask for, checked when it is built."""

from __future__ import annotations

import pytest

from zigllama_batch import GenerationConfig, InvalidRequest, StructuredOutput
from zigllama_batch.structured import MAX_SPEC_CHARS


def test_a_schema_is_kept_as_json_text_in_its_own_key_order() -> None:
    """Dicts and JSON text give the same constraint; property order is the output's order."""
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}
    from_dict = StructuredOutput.json_schema(schema)
    from_text = StructuredOutput.json_schema(
        '{"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}'
    )
    assert from_dict == from_text
    assert hash(from_dict) == hash(from_text)
    assert from_dict.spec.index('"b"') < from_dict.spec.index('"a"')
    assert StructuredOutput.json_object().kind == "json_schema"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StructuredOutput.json_schema("{not json"), "json_schema: not valid JSON"),
        (lambda: StructuredOutput.json_schema([1, 2]), "json_schema: a schema is a JSON object"),
        (lambda: StructuredOutput.json_schema({"x": float("nan")}), "not serialisable"),
        (lambda: StructuredOutput.regex(""), "regex: must be a non-empty str"),
        (lambda: StructuredOutput.choice([]), "choice: must be a non-empty list"),
        (lambda: StructuredOutput.choice("ab"), "choice: must be a non-empty list"),
        (lambda: StructuredOutput.choice(["a", ""]), "every option must be a non-empty str"),
        (lambda: StructuredOutput.grammar("  "), "grammar: must be a non-empty str"),
        (lambda: StructuredOutput.regex("a" * (MAX_SPEC_CHARS + 1)), "at most"),
        (lambda: StructuredOutput("xml", "<a/>"), "unknown kind"),  # type: ignore[arg-type]
        (lambda: GenerationConfig(structured="json"), "structured: must be a StructuredOutput"),  # type: ignore[arg-type]
    ],
)
def test_malformed_constraints_are_refused_naming_the_field(build: object, message: str) -> None:
    """Each malformed constraint raises InvalidRequest (a ValueError) saying what is wrong."""
    with pytest.raises(InvalidRequest, match=message):
        build()  # type: ignore[operator]
