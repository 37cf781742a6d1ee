"""The README keeps up with the code: what it documents exists, and what exists is documented."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from zigllama_batch import BatchStats

README = (Path(__file__).parent.parent / "README.md").read_text()


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
