"""What the command line shows while a model loads: a line rewritten in place on a terminal,
nothing when stderr is a file or captured."""

from __future__ import annotations

import io
from pathlib import Path

from zigllama_batch import load_model
from zigllama_batch._terminal import LoadLine, StatusLine


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_loading_shows_tensors_then_one_line_when_done(tiny_path: Path) -> None:
    """On a terminal, the load line counts tensors and MiB, says when the tokenizer is built,
    and ends as one kept line naming the file, the time and the totals."""
    out = _Terminal()
    load_model(tiny_path, on_progress=LoadLine(out, interval_s=0))
    text = out.getvalue()
    assert "\rloading tiny.gguf: 0/" in text
    assert "\rloading tiny.gguf: building the tokenizer, " in text
    last = text.rsplit("\r", 1)[-1]
    assert last.startswith("loaded tiny.gguf in ")
    assert last.endswith(" MiB)\x1b[K\n")
    assert text.count("\n") == 1  # the rest were rewritten in place


def test_the_load_line_is_throttled_but_shows_every_stage(tiny_path: Path) -> None:
    """Within the interval only stage changes are drawn: the first count, the tokenizer and
    the finished line."""
    out = _Terminal()
    load_model(tiny_path, on_progress=LoadLine(out, interval_s=3600))
    assert out.getvalue().count("\r") == 3


def test_nothing_is_written_where_stderr_is_not_a_terminal(tiny_path: Path) -> None:
    """Piped or captured, loading writes nothing, and a status line neither."""
    out = io.StringIO()
    load_model(tiny_path, on_progress=LoadLine(out, interval_s=0))
    status = StatusLine(out)
    status.show("generating ...")
    status.clear()
    assert out.getvalue() == ""


def test_a_status_line_is_erased_once_and_only_when_showing() -> None:
    """clear() erases a shown line once; a final line stays and is never erased."""
    out = _Terminal()
    status = StatusLine(out)
    status.clear()
    assert out.getvalue() == ""
    status.show("warming up")
    status.clear()
    status.clear()
    assert out.getvalue() == "\rwarming up\x1b[K\r\x1b[K"
    status.show("done", final=True)
    status.clear()
    assert out.getvalue().endswith("\rdone\x1b[K\n")
