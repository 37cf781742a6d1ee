"""GenerationConfig: presets are valid, and every invalid field raises ValueError naming it."""

from __future__ import annotations

import dataclasses

import pytest

from zigllama_batch import GenerationConfig


@pytest.mark.parametrize("preset", ["greedy", "precise", "balanced", "creative"])
def test_presets_are_valid_and_overridable(preset: str) -> None:
    """Each preset builds, and keyword overrides win."""
    config = getattr(GenerationConfig, preset)(max_tokens=7)
    assert config.max_tokens == 7
    assert GenerationConfig.greedy().is_greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_p", -0.1),
        ("top_p", 1.01),
        ("min_p", -0.1),
        ("min_p", 2),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 1e-39),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("seed", 1.0),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-2]),
        ("ignore_eos", 1),
        ("logprobs", "yes"),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", 21),
        ("prompt_logprobs", True),
        ("prompt_logprobs", 2.0),
    ],
)
def test_invalid_field_raises_value_error_naming_it(field: str, value: object) -> None:
    """A bad value raises ValueError whose message starts with the field's name."""
    with pytest.raises(ValueError, match=f"^{field}:"):
        GenerationConfig(**{field: value})  # type: ignore[arg-type]


def test_config_is_frozen_and_hashable() -> None:
    """Configs are immutable values; lists given for stop become tuples."""
    config = GenerationConfig(stop=["a", "b"], stop_token_ids=[3])
    assert config.stop == ("a", "b")
    assert hash(config) == hash(GenerationConfig(stop=("a", "b"), stop_token_ids=(3,)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_tokens = 3  # type: ignore[misc]
    assert config.with_(max_tokens=3).max_tokens == 3
    with pytest.raises(ValueError, match=r"^max_tokens:"):
        config.with_(max_tokens=-3)
