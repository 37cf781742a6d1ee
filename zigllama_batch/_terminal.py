"""What the command line shows on stderr while it works, where no output says it is busy.

Inside: :class:`LoadLine`, a load progress callback (tensors read out of the file's, MiB,
seconds, then the tokenizer), and :class:`StatusLine`, one line saying what is going on until
the first output replaces it.

Both write only to a terminal, one line rewritten in place: piped into a file or captured by
tests, stderr keeps only what the commands print on purpose.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from .engine.gguf_loader import LoadProgress

__all__ = ["FIRST_RUN_NOTE", "LoadLine", "StatusLine"]

FIRST_RUN_NOTE = "on a machine's first run this compiles the kernels: about 30 s"
"""Why a model's first steps may take long (they load the compiled kernels, or compile them)."""

_ERASE_TO_END = "\x1b[K"  # ANSI: clear the rest of the line (what a shorter line leaves)


class StatusLine:
    """One line on a terminal, rewritten in place; nothing anywhere else."""

    def __init__(self, out: TextIO | None = None) -> None:
        """Args:
        out: where to write (default: ``sys.stderr`` as it is now); nothing is written unless
            it is a terminal.
        """
        self.out = sys.stderr if out is None else out
        self.live = self.out.isatty()
        self._showing = False

    def show(self, text: str, *, final: bool = False) -> None:
        """Replace the line with ``text``; ``final`` keeps it and moves to the next line."""
        if not self.live:
            return
        end = "\n" if final else ""
        self.out.write(f"\r{text}{_ERASE_TO_END}{end}")
        self.out.flush()
        self._showing = not final

    def clear(self) -> None:
        """Erase the line, if one is showing."""
        if self._showing:
            self.out.write(f"\r{_ERASE_TO_END}")
            self.out.flush()
            self._showing = False


class LoadLine:
    """A load progress callback (:class:`~zigllama_batch.engine.gguf_loader.LoadProgress`) that
    shows how far a model's loading has got on a terminal, at most every ``interval_s``, and
    leaves one line when it is done: ``loaded NAME in 0.4 s (272 tensors, 89 MiB)``.

    Seconds count from the first progress, when the file is open: a download before it shows
    its own progress.
    """

    def __init__(self, out: TextIO | None = None, *, interval_s: float = 0.1) -> None:
        self.line = StatusLine(out)
        self.interval_s = interval_s
        self._started: float | None = None
        self._shown = -math.inf
        self._stage = ""

    def __call__(self, update: LoadProgress) -> None:
        """Show ``update`` (when the stage changed, or ``interval_s`` has passed)."""
        now = time.monotonic()
        if self._started is None:
            self._started = now
        if update.stage == self._stage and now - self._shown < self.interval_s:
            return
        self._stage, self._shown = update.stage, now
        elapsed, name = now - self._started, update.path.name
        if update.stage == "ready":
            self.line.show(
                f"loaded {name} in {elapsed:.1f} s ({update.tensors_total} tensors, "
                f"{_mib(update.bytes_total)} MiB)",
                final=True,
            )
        elif update.stage == "tokenizer":
            self.line.show(f"loading {name}: building the tokenizer, {elapsed:.1f} s")
        else:
            self.line.show(
                f"loading {name}: {update.tensors_done}/{update.tensors_total} tensors, "
                f"{_mib(update.bytes_done)}/{_mib(update.bytes_total)} MiB, {elapsed:.1f} s"
            )


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}"
