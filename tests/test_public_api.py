"""The public surface: one sorted __all__, every name importable and documented."""

from __future__ import annotations

import importlib
import inspect

import pytest

import zigllama_batch

MODULES = [
    "zigllama_batch",
    "zigllama_batch.batching",
    "zigllama_batch.engine",
    "zigllama_batch.errors",
    "zigllama_batch.generation",
    "zigllama_batch.server",
    "zigllama_batch.testing",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_all_is_sorted_and_importable(module_name: str) -> None:
    """__all__ is sorted, and each name in it exists."""
    module = importlib.import_module(module_name)
    names = list(module.__all__)
    assert names == sorted(names)
    for name in names:
        assert hasattr(module, name), name


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_documented(module_name: str) -> None:
    """Each public class and function has a docstring, and so do its public methods."""
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        assert inspect.getdoc(obj), name
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr}"


@pytest.mark.parametrize("module_name", MODULES)
def test_errors_form_one_tree(module_name: str) -> None:
    """Every exported exception derives from ZigllamaBatchError."""
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, zigllama_batch.ZigllamaBatchError), name
