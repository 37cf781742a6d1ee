"""The README keeps up with the code: what it documents exists, and what exists is documented."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from zigllama_batch import BatchStats
from zigllama_batch.cli import _parser
from zigllama_batch.testing import ServerProcess

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The text of the README section headed ``title`` (up to the next heading of its level)."""
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^\1 |\Z)", README, re.M | re.S)
    assert match, title
    return match.group(2)


def test_every_batch_stats_field_is_in_the_table() -> None:
    """The "In Python" section's table names every BatchStats field, and `finished`."""
    text = section("In Python")
    for name in [f.name for f in fields(BatchStats)] + ["finished"]:
        assert f"`{name}`" in text, name


def test_every_cli_option_is_listed_and_help_is_pointed_to() -> None:
    """The "Command line" section lists every option of every command, and says where the
    defaults are described."""
    text = section("Command line")
    assert "zigllama-batch COMMAND --help" in text
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        usage = next(line for line in text.splitlines() if f"zigllama-batch {name} " in line)
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"[{option}" in usage, f"{name} {option}"


def test_the_offline_test_command_deselects_the_real_model_tests() -> None:
    """The README says how to run the tests without network, with a marker pytest knows."""
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "markers"
    ]
    assert any(m.startswith("real_model:") for m in markers)
    assert 'python -m pytest -m "not real_model"' in README


@pytest.mark.real_model
def test_the_openai_client_example_gives_a_sensible_answer(tmp_path: Path) -> None:
    """The README's openai client example, run as printed against `zigllama-batch serve` on
    the default model, prints the answer its comment shows (greedy decoding: the same on any
    machine)."""
    text = section("Serve over HTTP")
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "OpenAI(" in b)
    expected = re.search(r"^# (.+)$", code, re.M)
    assert expected, "the example shows its output in a last comment"
    with ServerProcess() as server:
        script = tmp_path / "client.py"
        script.write_text(code.replace("http://127.0.0.1:8000", server.base_url))
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected.group(1)
