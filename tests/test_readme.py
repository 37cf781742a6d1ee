"""The README and docs/ keep up with the code: what they document exists, what exists is
documented, and every link between them lands."""

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
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 260
"""The README is a user's first page; the details live in docs/."""


def section(title: str, text: str = README) -> str:
    """The text of the section headed ``title`` in ``text`` (the README unless given), up to the
    next heading of its level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^\1 |\Z)", text, re.M | re.S)
    assert match, title
    return match.group(2)


def doc(name: str) -> str:
    """The text of ``docs/<name>``."""
    return (ROOT / "docs" / name).read_text()


def anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_code(text: str) -> str:
    """``text`` without its fenced code blocks (whose brackets are not links)."""
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.M | re.S)


def test_every_batch_stats_field_is_in_the_table() -> None:
    """docs/python.md's BatchStats table names every BatchStats field, and `finished`."""
    text = section("BatchStats", doc("python.md"))
    for name in [f.name for f in fields(BatchStats)] + ["finished"]:
        assert f"`{name}`" in text, name


def test_every_cli_option_is_listed_and_help_is_pointed_to() -> None:
    """The README's "Command line" section lists every option of every command, and says where
    the defaults are described."""
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
    """The openai client example in the README's "Serve over HTTP" section, run as printed
    against `zigllama-batch serve` on the default model, prints the answer its comment shows
    (greedy decoding: the same on any machine)."""
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


def test_the_readme_stays_short() -> None:
    """The README stays a short page for users; what does not fit goes to docs/."""
    lines = README.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"


def test_every_relative_link_lands() -> None:
    """Every relative link in README.md and docs/*.md names a file that exists, and a
    #fragment names a heading of that file."""
    assert DOCS, "docs/ holds the details the README links to"
    broken = []
    for page in [ROOT / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_file():
                broken.append(f"{page.name}: {target} (no such file)")
            elif fragment and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", without_code(linked.read_text()), re.M)
                if fragment not in {anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_install_commands_work_from_the_checkout() -> None:
    """The README's first command installs what `zigllama-batch serve` needs, and no hint in the
    package tells users to install `zigllama-batch[...]` from an index it is not published on."""
    assert "pip install -e '.[server]' && zigllama-batch demo" in README
    hints = [
        f"{path.relative_to(ROOT)}"
        for path in (ROOT / "zigllama_batch").rglob("*.py")
        if "zigllama-batch[" in path.read_text()
    ]
    assert not hints, hints
