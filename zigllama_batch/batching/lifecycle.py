"""The processor's lifecycle: one explicit state, the moves allowed between states, and why a
request is refused in each.

::

    NEW ──start()──▶ RUNNING ──aclose()──▶ DRAINING ──workers idle──▶ CLOSED
     │                  │                     │                          ▲
     │                  │ aclose(drain=False) │ drain timeout, or        │
     │                  ▼                     ▼ aclose(drain=False)      │
     │               STOPPING ◀───────────────┘ ─────────────────────────┤
     │                                                                   │
     │   a worker or the deadline watcher dies (RUNNING, DRAINING or     │
     │   STOPPING) ──▶ FAILED ──aclose()─────────────────────────────────┤
     └──aclose() before start()──────────────────────────────────────────┘

Inside: :class:`ProcessorState` and :class:`Lifecycle`. The processor moves the state; the
scheduler and the server only read it (the scheduler admits queued requests while
:attr:`Lifecycle.admitting`; ``/health`` is ok only while RUNNING).
"""

from __future__ import annotations

import enum

from ..errors import ProcessorStopped

__all__ = ["Lifecycle", "ProcessorState"]


class ProcessorState(enum.Enum):
    """Lifecycle of a :class:`~zigllama_batch.batching.processor.BatchProcessor`."""

    NEW = "new"
    """Built, not started: requests are refused."""
    RUNNING = "running"
    """Accepting and serving requests."""
    DRAINING = "draining"
    """Closing: new requests are refused; queued and running ones finish."""
    STOPPING = "stopping"
    """Closing without draining: pending requests end with ProcessorStopped."""
    FAILED = "failed"
    """A background task died of an internal error; pending requests were ended with
    ProcessorStopped and new ones are refused. ``aclose()`` still releases everything."""
    CLOSED = "closed"
    """Closed: nothing runs, requests are refused."""


_MOVES: dict[ProcessorState, frozenset[ProcessorState]] = {
    ProcessorState.NEW: frozenset({ProcessorState.RUNNING, ProcessorState.CLOSED}),
    ProcessorState.RUNNING: frozenset(
        {ProcessorState.DRAINING, ProcessorState.STOPPING, ProcessorState.FAILED}
    ),
    ProcessorState.DRAINING: frozenset(
        {ProcessorState.STOPPING, ProcessorState.FAILED, ProcessorState.CLOSED}
    ),
    ProcessorState.STOPPING: frozenset({ProcessorState.FAILED, ProcessorState.CLOSED}),
    ProcessorState.FAILED: frozenset({ProcessorState.CLOSED}),
    ProcessorState.CLOSED: frozenset(),
}


class Lifecycle:
    """The state of one processor, changed only through :meth:`move` and :meth:`fail`."""

    def __init__(self) -> None:
        self._state = ProcessorState.NEW
        self._failure: BaseException | None = None

    @property
    def state(self) -> ProcessorState:
        """Where the processor is now."""
        return self._state

    @property
    def failure(self) -> BaseException | None:
        """The internal error that failed the processor, if one did (kept after close)."""
        return self._failure

    @property
    def accepting(self) -> bool:
        """True while new requests are accepted."""
        return self._state is ProcessorState.RUNNING

    @property
    def admitting(self) -> bool:
        """True while queued requests may still start (running, or draining)."""
        return self._state in (ProcessorState.RUNNING, ProcessorState.DRAINING)

    @property
    def draining(self) -> bool:
        """True while closing with a drain."""
        return self._state is ProcessorState.DRAINING

    def can_move(self, to: ProcessorState) -> bool:
        """Whether the state may move to ``to`` now."""
        return to in _MOVES[self._state]

    def move(self, to: ProcessorState) -> None:
        """Move to ``to``.

        Raises:
            RuntimeError: the move is not allowed from the current state.
        """
        if not self.can_move(to):
            raise RuntimeError(f"a processor that is {self._state.value} cannot become {to.value}")
        self._state = to

    def fail(self, error: BaseException) -> None:
        """Record an internal error and move to FAILED (the first error is kept; a closed
        processor stays closed)."""
        if self._failure is None:
            self._failure = error
        if self.can_move(ProcessorState.FAILED):
            self._state = ProcessorState.FAILED

    def refusal(self) -> ProcessorStopped:
        """The error for a request submitted now, saying why it is refused."""
        if self._state is ProcessorState.NEW:
            why = "start it with `async with` or `await start()`"
        elif self._failure is not None:
            why = f"it stopped after an internal error: {self._failure!r}"
        else:
            why = self._state.value
        return ProcessorStopped(f"the processor is not running ({why})")

    def __repr__(self) -> str:
        return f"<Lifecycle {self._state.value}>"
