"""Admission: which waiting requests join a worker's batch now, and in what order.

Inside: :class:`Admission`. The strategy says how many may join; they are taken in queue
order, except that within the first waiting request's aged priority level, those whose prompts
have the longest cached prefixes go first, and a preempted request at the head rejoins
whatever the plan. Each must fit in key/value memory (the KV manager places it, with the
prefix it reuses); the first that does not stops admission, so nobody passes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import GenerationError
from ..kv import KVManager
from .clock import Clock
from .lifecycle import Lifecycle
from .queue import RequestQueue
from .request import RequestState, TrackedRequest
from .strategies import Plan, Strategy, WaitingView
from .types import BatchConfig, EngineLike

__all__ = ["PREFERENCE_WINDOW", "Admission"]

PREFERENCE_WINDOW = 32
"""Waiting requests looked at for cached prefixes when admitting (each lookup compares the
prompt with every slot: tens of microseconds)."""


class Admission:
    """Moves requests from the queue into batches (event loop only)."""

    def __init__(
        self,
        queue: RequestQueue,
        kv: KVManager,
        strategy: Strategy,
        engine: EngineLike,
        config: BatchConfig,
        clock: Clock,
        lifecycle: Lifecycle,
        end: Callable[..., Any],
    ) -> None:
        self.queue = queue
        self.kv = kv
        self.strategy = strategy
        self.engine = engine
        self.config = config
        self.clock = clock
        self.lifecycle = lifecycle
        self.end = end

    def admit(self, running: list[TrackedRequest]) -> Plan:
        """Plan, and move the requests the plan admits (in queue order, while their prompts
        fit in memory) from the queue into ``running`` (a worker's batch), each with a slot
        and a sampling state; returns the plan."""
        now = self.clock.now()
        head: list[tuple[int, int]] = []
        if self.strategy.needs_head:
            peeked = self.queue.peek(self.config.max_batch_size)
            head = [(len(r.prompt_ids), r.config.max_tokens) for r in peeked]
        waiting = WaitingView(len(self.queue), self.queue.oldest_submitted(), head)
        plan = self.strategy.plan(waiting, len(running), now, draining=self.lifecycle.draining)
        room = min(self.config.max_batch_size - len(running), self.kv.capacity())
        admit = min(plan.admit, room)
        preferred = self._preferred(admit)
        first = self.queue.first()
        if first is not None and first.seq.restarts and room:  # preempted: rejoins whatever
            admit = max(admit, 1)
        for _ in range(admit):
            rec = self._next(preferred)
            if rec is None:
                break
            try:
                if not self.kv.allocate(rec, running):
                    break  # its prompt does not fit in memory now: it waits, first in line
            except Exception as exc:  # a bookkeeping bug: this request fails, not the processor
                self.queue.take(rec, now)
                rec.state = RequestState.RUNNING
                if rec.seq.slot >= 0:
                    self.kv.free(rec, keep=False)
                error = GenerationError(f"could not place request {rec.id!r}: {exc!r}")
                error.__cause__ = exc
                self.end(rec, RequestState.FAILED, error=error)
                continue
            self.queue.take(rec, now)
            rec.state = RequestState.RUNNING  # out of the queue: no longer counted there
            rec.admitted = rec.admitted or now
            running.append(rec)  # from here on, _reap frees the slot whatever happens
            if rec.seq.sampling is not None:
                continue  # prepared in a worker thread, or preempted (its state goes on)
            try:
                rec.seq.sampling = self.engine.new_sampling(rec.config, rec.prompt_ids)
            except Exception as exc:
                error = GenerationError(f"could not start request {rec.id!r}: {exc!r}")
                error.__cause__ = exc
                self.end(rec, RequestState.FAILED, error=error)
        return plan

    def _preferred(self, n: int) -> list[TrackedRequest]:
        """Requests to admit ahead of their turn, best first: within the first waiting
        request's aged priority level, those whose prompts have the longest cached prefixes
        (they cost least to start). Ageing bounds what this can cost anyone: a request that
        arrives an ageing interval later is a level behind, so the first one waits at most
        about one interval more."""
        if n <= 0 or not self.kv.prefers:
            return []
        level = self.queue.peek_level(PREFERENCE_WINDOW)
        if len(level) < 2:
            return []
        cached = {id(r): self.kv.preference(r) for r in level}
        if not any(cached.values()):
            return []
        return sorted(level, key=lambda r: -cached[id(r)])  # stable: ties keep their turn

    def _next(self, preferred: list[TrackedRequest]) -> TrackedRequest | None:
        """The next request to admit (left in the queue): the best preferred one still
        waiting, else the queue's first."""
        while preferred:
            rec = preferred.pop(0)
            if rec.state is RequestState.QUEUED:
                return rec
        return self.queue.first()
