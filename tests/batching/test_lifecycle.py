"""The processor's lifecycle alone: the allowed moves, a failure, and why requests are refused."""

from __future__ import annotations

import pytest

from zigllama_batch import ProcessorState, ProcessorStopped
from zigllama_batch.batching.lifecycle import Lifecycle

S = ProcessorState


def test_a_drained_close_goes_through_draining() -> None:
    """NEW -> RUNNING -> DRAINING -> CLOSED; only RUNNING accepts, DRAINING still admits."""
    life = Lifecycle()
    seen = []
    for state in (S.RUNNING, S.DRAINING, S.CLOSED):
        life.move(state)
        seen.append((life.accepting, life.admitting, life.draining))
    assert seen == [(True, True, False), (False, True, True), (False, False, False)]


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ((), S.DRAINING),  # a processor never started cannot drain
        ((S.RUNNING,), S.NEW),
        ((S.RUNNING,), S.CLOSED),  # RUNNING closes through DRAINING or STOPPING
        ((S.RUNNING, S.STOPPING), S.DRAINING),  # stopping is not undone by a drain
        ((S.CLOSED,), S.RUNNING),  # closed is final
    ],
)
def test_moves_outside_the_drawing_are_refused(
    path: tuple[ProcessorState, ...], target: ProcessorState
) -> None:
    """Each move not drawn in the module docstring raises RuntimeError and changes nothing."""
    life = Lifecycle()
    for state in path:
        life.move(state)
    before = life.state
    with pytest.raises(RuntimeError, match="cannot become"):
        life.move(target)
    assert life.state is before


def test_a_failure_is_a_state_and_keeps_its_first_cause() -> None:
    """fail() moves to FAILED from any running state, keeps the first error, says why in
    refusals, and a failed processor still closes."""
    life = Lifecycle()
    life.move(S.RUNNING)
    life.move(S.DRAINING)
    first, second = RuntimeError("first"), RuntimeError("second")
    life.fail(first)
    life.fail(second)
    assert life.state is S.FAILED
    assert life.failure is first
    assert not life.admitting
    refusal = life.refusal()
    assert isinstance(refusal, ProcessorStopped)
    assert "internal error" in str(refusal)
    assert "first" in str(refusal)
    life.move(S.CLOSED)
    life.fail(second)
    assert life.state is S.CLOSED


def test_refusals_say_how_to_start_or_where_the_processor_is() -> None:
    """A refusal before start says how to start; after close it names the state."""
    life = Lifecycle()
    assert "async with" in str(life.refusal())
    life.move(S.RUNNING)
    life.move(S.STOPPING)
    assert "stopping" in str(life.refusal())
