"""JSON schemas as this library reads them: an object schema that lists its keys is closed
unless it says otherwise.

Inside: :func:`close_objects`, applied to every JSON schema before llguidance compiles it. In
JSON Schema a missing ``additionalProperties`` means any other key is allowed, and under a
constraint a small model takes that licence: asked for ``{"city", "unit"}`` it goes on to copy
keys from the schema itself and rarely closes the object. So, as llama.cpp does by default and
as OpenAI's strict mode requires, a schema with ``properties`` or ``patternProperties`` and no
``additionalProperties`` gets ``additionalProperties: false``, at every level: properties,
array items, ``$defs``, the alternatives of ``anyOf`` and ``oneOf``. An explicit
``additionalProperties`` (``true``, or a schema) is kept, and ``{"type": "object"}`` without
properties stays any object.

Left open on purpose: objects whose keys are merged from several schemas at one place (``allOf``
with two or more parts, or ``$ref``, ``anyOf`` or ``oneOf`` beside object keywords), and what
their ``$ref`` points to. There, closing one part would forbid the keys the other parts add
(JSON Schema's rule, which llguidance follows), turning a valid schema into one nothing
satisfies. Schemas under ``not``, ``if``, ``then``, ``else`` and ``dependentSchemas`` are left
as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["close_objects"]

_KEYED = ("properties", "patternProperties")
"""Keywords that list an object's keys: their presence makes a schema one to close."""
_OBJECT_KEYWORDS = (*_KEYED, "additionalProperties", "required", "propertyNames")
"""Keywords that shape an object: beside ``$ref``, ``anyOf`` or ``oneOf`` they merge with it."""
_EXPLICIT = ("additionalProperties", "unevaluatedProperties")
"""Keywords that already say which other keys are allowed."""
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_ONES = ("additionalProperties", "items", "additionalItems", "contains", "unevaluatedItems")
_ALTERNATIVES = ("allOf", "anyOf", "oneOf")
"""Lists of schemas that apply to the same value as the schema holding them."""


def close_objects(schema: Any) -> Any:
    """``schema`` (parsed JSON, modified in place and returned) with every object schema that
    lists its keys and does not say whether others are allowed closed to other keys."""
    merged: set[int] = set()  # ids of the schemas left open: parts of a merged object
    for node in _schemas(schema):
        if _merges(node):
            _mark_merged(node, schema, merged)
    for node in _schemas(schema):
        if (
            id(node) not in merged
            and any(k in node for k in _KEYED)
            and not any(k in node for k in _EXPLICIT)
        ):
            node["additionalProperties"] = False
    return schema


def _schemas(node: Any) -> Iterator[dict[str, Any]]:
    """Every schema object in ``node``, itself included (parents before their children)."""
    if not isinstance(node, dict):
        return
    yield node
    for key in _SCHEMA_MAPS:
        if isinstance(children := node.get(key), dict):
            for child in children.values():
                yield from _schemas(child)
    for key in _SCHEMA_LISTS:
        if isinstance(children := node.get(key), list):
            for child in children:
                yield from _schemas(child)
    for key in _SCHEMA_ONES:
        yield from _schemas(node.get(key))


def _merges(node: dict[str, Any]) -> bool:
    """Whether ``node`` builds one object out of two or more schemas."""
    parts = len(node["allOf"]) if isinstance(node.get("allOf"), list) else 0
    parts += "$ref" in node
    parts += "anyOf" in node or "oneOf" in node
    parts += any(k in node for k in _OBJECT_KEYWORDS)
    return parts >= 2


def _mark_merged(node: Any, root: Any, merged: set[int]) -> None:
    """Mark ``node`` and every schema that applies to the same value (its alternatives and
    what its ``$ref`` points to, followed through) as parts of a merged object."""
    if not isinstance(node, dict) or id(node) in merged:
        return
    merged.add(id(node))
    for key in _ALTERNATIVES:
        if isinstance(parts := node.get(key), list):
            for part in parts:
                _mark_merged(part, root, merged)
    if isinstance(ref := node.get("$ref"), str):
        _mark_merged(_resolve(root, ref), root, merged)


def _resolve(root: Any, ref: str) -> Any:
    """The schema a local ``$ref`` (``#`` or a JSON pointer after it) points to, or None."""
    if not ref.startswith("#"):
        return None
    node = root
    for raw in ref[1:].split("/")[1:]:
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node
