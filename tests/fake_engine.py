"""A fake engine with the real ``step()`` signature, for fast and exact scheduling tests.

It uses the tiny model's real tokenizer (so text, stop rules and chat prompts are real) but no
model: each sampled token is a letter chosen from the sequence's position, so a sequence's output
does not depend on what it is batched with (or, with ``content_sensitive``, from every token its
slot holds, so a prefix reused wrongly changes the output). Tests can hold steps (to keep the
engine busy), make a step raise, charge a ManualClock per step, and read back every step's
composition. It keeps the token ids each slot holds, as a real cache keeps their keys and
values, and checks what a real step would refuse: two items in one slot, a slot outside the
cache, a step that starts past what its slot holds, a copy from a slot that does not hold the
prefix. A scored prompt chunk (prompt logprobs) gets logits that favour, at each position, the
letter the fake would sample there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zigllama_batch import GenerationConfig, ManualClock, Tokenizer
from zigllama_batch.engine import SequenceStep, TokenSample


@dataclass(frozen=True)
class StepItem:
    slot: int
    n_tokens: int
    start_pos: int
    sampled: bool


class FakeEngine:
    """Engine double: real tokenizer, scripted steps."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        n_slots: int = 8,
        max_context: int = 256,
        clock: ManualClock | None = None,
        step_cost: Callable[[Sequence[SequenceStep]], float] | None = None,
        content_sensitive: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self._n_slots = n_slots
        self._max_context = max_context
        self.clock = clock
        self.step_cost = step_cost
        self.steps: list[list[StepItem]] = []
        self.fail_with: BaseException | None = None
        self._gate = threading.Event()
        self._gate.set()
        self.waiting_at_gate = threading.Event()
        self.letters = [tokenizer.encode(c)[0] for c in "abcdefghijklmnopqrstuvwxyz"]
        self.content_sensitive = content_sensitive
        self.held: list[list[int]] = [[] for _ in range(n_slots)]
        """The token ids whose "keys and values" each slot holds, by position."""
        self.pool: dict[int, list[int]] = {}
        """Pool blocks: the token ids saved in each."""
        self.block_tokens = 0
        self._running: Sequence[SequenceStep] = ()  # the step in progress
        self.most_held = 0
        """The most positions all slots held together after a step."""

    # -- the engine signature -----------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return self._n_slots

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def model_name(self) -> str:
        return "fake"

    def new_sampling(self, config: GenerationConfig, prompt_ids: Sequence[int]) -> Any:
        return config

    def step(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        self._running = items
        try:
            return self._step(items)
        finally:
            self._running = ()

    def _step(self, items: Sequence[SequenceStep]) -> list[TokenSample | None]:
        self.waiting_at_gate.set()
        self._gate.wait()
        self.waiting_at_gate.clear()
        slots = [it.slot for it in items]
        assert len(set(slots)) == len(slots), f"one slot twice in a step: {slots}"
        assert all(0 <= s < self._n_slots for s in slots), f"slot outside the cache: {slots}"
        self.steps.append(
            [
                StepItem(it.slot, len(it.token_ids), it.start_pos, it.sampling is not None)
                for it in items
            ]
        )
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        for it in items:  # saves to the pool first, then copies, as the real engine does
            if it.transfer is not None and (save := it.transfer.save) is not None:
                held, b = self.held[it.slot], self.block_tokens
                assert len(held) >= save.end, "saving positions a slot does not hold"
                assert len(save.blocks) == -(-(save.end - save.start) // b), save
                for i, block in enumerate(save.blocks):
                    start = save.start + i * b
                    self.pool[block] = held[start : min(start + b, save.end)]
        for it in items:
            if it.transfer is None:
                continue
            if (from_pool := it.transfer.from_pool) is not None:
                saved = [t for block in from_pool for t in self.pool[block]]
                assert len(saved) >= it.start_pos, (
                    f"copy of {it.start_pos} positions from pool blocks holding {len(saved)}"
                )
                self.held[it.slot] = saved[: it.start_pos]
            if (from_slot := it.transfer.from_slot) is not None:
                source = self.held[from_slot]
                assert from_slot != it.slot, f"copy of slot {it.slot} onto itself"
                assert len(source) >= it.start_pos, (
                    f"copy of {it.start_pos} positions from slot {from_slot}, which holds "
                    f"{len(source)}"
                )
                self.held[it.slot] = source[: it.start_pos]
        for it in items:
            held = self.held[it.slot]
            assert len(held) >= it.start_pos, (
                f"step at position {it.start_pos} in slot {it.slot}, which holds {len(held)}"
            )
            self.held[it.slot] = [*held[: it.start_pos], *it.token_ids]
        self.most_held = max(self.most_held, sum(map(len, self.held)))
        for it in items:
            if it.scores is not None:
                it.scores.score(it.start_pos, self.logits(it.start_pos, len(it.token_ids)))
        if self.clock is not None and self.step_cost is not None:
            self.clock.advance(self.step_cost(items))
        return [
            TokenSample(self._next_token(it), 0.0) if it.sampling is not None else None
            for it in items
        ]

    def _next_token(self, item: SequenceStep) -> int:
        position = item.start_pos + len(item.token_ids)
        if not self.content_sensitive:
            return self.token_at(position)
        return self.letters[hash(tuple(self.held[item.slot][:position])) % 26]

    def check_structured(self, structured: Any) -> None:
        pass

    def reserve_pool(self, n_blocks: int, block_tokens: int) -> None:
        self.block_tokens = block_tokens

    @property
    def kv_bytes_per_token(self) -> int:
        return 1024  # a pool bound in MiB holds 1,024 positions per MiB

    def release_kv(self, slot: int, keep: int) -> None:
        assert not any(it.slot == slot for it in self._running), f"slot {slot} is in a step"
        del self.held[slot][keep:]

    # -- test controls ------------------------------------------------------------------------
    def token_at(self, position: int) -> int:
        """The token a sequence gets after ``position`` tokens."""
        return self.letters[position % 26]

    def logits(self, start: int, n: int) -> np.ndarray:
        """The fake's next-token logits at positions ``start`` to ``start + n - 1``
        ``(n, vocab)``: 4 for the letter :meth:`token_at` gives after each, 0 elsewhere."""
        rows = np.zeros((n, self.tokenizer.vocab_size), np.float32)
        rows[np.arange(n), [self.token_at(start + i + 1) for i in range(n)]] = 4.0
        return rows

    def hold(self) -> None:
        """Make the next steps wait until release()."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def batch_sizes(self) -> list[int]:
        return [len(s) for s in self.steps]
