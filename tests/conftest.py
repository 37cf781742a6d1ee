"""Shared fixtures: tiny GGUF models written per session, and the real default model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_gguf import TinySpec, write_tiny_gguf

from zigllama_batch import LLaMAModel, Tokenizer, load_model
from zigllama_batch.engine import SequenceStep


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float32 Llama GGUF with a byte-level BPE vocabulary."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny(tiny_path: Path) -> tuple[LLaMAModel, Tokenizer]:
    """The tiny model and tokenizer, loaded once."""
    return load_model(tiny_path)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels(tiny: tuple[LLaMAModel, Tokenizer]) -> None:
    """The engine's compiled kernels, compiled (or loaded from numba's cache) before any test
    runs: on a fresh machine their first use takes seconds, which a test bounded in real time
    must not pay. A prompt chunk of 20 tokens (the threaded paths), a 4-token item and one
    decode token touch every kernel a float32 model's step uses."""
    model, _ = tiny
    cache = model.new_cache(2, 64)
    model.step([SequenceStep(0, list(range(3, 23)), 0)], cache)
    model.step([SequenceStep(1, [5, 6, 7, 8], 0), SequenceStep(0, [9], 20)], cache)


@pytest.fixture
def write_gguf(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny GGUF with the given TinySpec fields and return its path."""

    def write(name: str = "model.gguf", **fields: object) -> Path:
        return write_tiny_gguf(tmp_path / name, TinySpec(**fields))  # type: ignore[arg-type]

    return write


@pytest.fixture(scope="session")
def real() -> tuple[LLaMAModel, Tokenizer]:
    """The real default model (SmolLM2-135M-Instruct), fetched into the cache on first use."""
    return load_model(progress=False)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Run every async test on the default asyncio loop and on uvloop."""
    import asyncio

    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
