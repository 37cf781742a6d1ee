"""Each batching default is declared once: `serve`, the demo and the Ray app all start from
BatchConfig.serving(), and the per-step token budget follows the batch size in one place."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from zigllama_batch import BatchConfig, BatchingStrategy, load_model
from zigllama_batch.cli import _parser, main
from zigllama_batch.demo import demo_config
from zigllama_batch.generation import DEFAULT_ACTIVATIONS

SERVING = BatchConfig.serving()


def _flag_defaults(command: str) -> dict[str, Any]:
    """Each option of one sub-command by its destination, with its default."""
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = commands.choices[command]
    return {a.dest: a.default for a in parser._actions}


def test_the_serving_config_is_continuous_batching_over_the_library_defaults() -> None:
    """serving() changes the strategy and nothing else the library declares."""
    assert SERVING.strategy is BatchingStrategy.CONTINUOUS
    assert dataclasses.replace(SERVING, strategy=BatchConfig().strategy) == BatchConfig()


def test_the_step_budget_grows_with_the_batch_size_unless_given() -> None:
    """A batch larger than the default budget gets a budget of its size; a given one stays."""
    assert BatchConfig.serving(max_batch_size=8).max_step_tokens == BatchConfig().max_step_tokens
    assert BatchConfig.serving(max_batch_size=2000).max_step_tokens == 2000
    assert BatchConfig.serving(max_batch_size=8, max_step_tokens=8).max_step_tokens == 8
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchConfig.serving(max_batch_size=0)


@pytest.mark.parametrize("command", ["demo", "serve"])
def test_cli_flags_default_to_the_serving_config(command: str) -> None:
    """`demo` and `serve` show and use the serving config's strategy and batch size."""
    flags = _flag_defaults(command)
    assert flags["strategy"] == SERVING.strategy.value
    assert flags["max_batch_size"] == SERVING.max_batch_size
    if command == "serve":
        assert flags["max_queue_size"] == SERVING.max_queue_size
    assert flags["activations"] == DEFAULT_ACTIVATIONS


def test_every_way_to_load_a_model_defaults_to_the_same_activations() -> None:
    """generate, demo, serve, the Ray app and load_model() all default to
    DEFAULT_ACTIVATIONS, the exact float32 products."""
    import inspect

    from zigllama_batch.ray_serve.app import RayAppArgs
    from zigllama_batch.server.run import serve

    assert DEFAULT_ACTIVATIONS == "float32"
    assert _flag_defaults("generate")["activations"] == DEFAULT_ACTIVATIONS
    assert RayAppArgs().activations == DEFAULT_ACTIVATIONS
    for function in (load_model, serve):
        default = inspect.signature(function).parameters["activations"].default
        assert default == DEFAULT_ACTIVATIONS


def test_serve_runs_the_config_its_flags_describe(
    monkeypatch: pytest.MonkeyPatch, tiny_path: Path
) -> None:
    """`serve` with no batching flags runs the serving config, and --max-batch-size beyond the
    default budget gets the budget serving() gives it."""
    import zigllama_batch.server.run

    seen: list[BatchConfig] = []

    def fake_serve(*, config: BatchConfig, **_: object) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(zigllama_batch.server.run, "serve", fake_serve)
    assert main(["serve", "--model", str(tiny_path)]) == 0
    assert main(["serve", "--model", str(tiny_path), "--max-batch-size", "1000"]) == 0
    assert seen == [SERVING, BatchConfig.serving(max_batch_size=1000)]


def test_the_demo_runs_the_serving_config_with_its_own_latency_target() -> None:
    """demo_config() is serving() but for ADAPTIVE's target, and takes the flags' values."""
    assert dataclasses.replace(demo_config(), latency_target_ms=SERVING.latency_target_ms) == (
        SERVING
    )
    assert demo_config("fixed_size", 1000) == BatchConfig.serving(
        strategy="fixed_size", max_batch_size=1000, latency_target_ms=10_000
    )


def test_the_ray_app_arguments_default_to_the_serving_config() -> None:
    """build_app's arguments default to serve's batching settings, and its replicas run the
    config serve would run."""
    from zigllama_batch.ray_serve import build_app
    from zigllama_batch.ray_serve.app import RayAppArgs
    from zigllama_batch.ray_serve.replica import ReplicaSettings

    args = RayAppArgs()
    assert args.strategy is SERVING.strategy
    assert args.max_batch_size == SERVING.max_batch_size
    assert args.max_queue_size == SERVING.max_queue_size
    bound = build_app({"max_batch_size": 1000})._bound_deployment
    settings = next(a for a in bound.init_args if isinstance(a, ReplicaSettings))
    assert settings.config == BatchConfig.serving(max_batch_size=1000)
    assert settings.activations == DEFAULT_ACTIVATIONS
    bound = build_app({"activations": "int8"})._bound_deployment
    settings = next(a for a in bound.init_args if isinstance(a, ReplicaSettings))
    assert settings.activations == "int8"
