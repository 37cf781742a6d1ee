"""KVManager alone, over the fake engine: allocation against the budget, rollback, stats."""

from __future__ import annotations

import pytest
from batch_helpers import tracked
from fake_engine import FakeEngine

from zigllama_batch import LLaMAModel, Tokenizer
from zigllama_batch.batching.request import TrackedRequest
from zigllama_batch.kv import KVManager


def manager(engine: FakeEngine, tokens: int, *, prefix_cache: bool = True) -> KVManager:
    return KVManager(
        engine,
        budget_bytes=tokens * engine.kv_bytes_per_token,
        prefix_cache=prefix_cache,
        pool_bytes=0,
        on_lookup=lambda queried, hit: None,
    )


def run(kv: KVManager, engine: FakeEngine, rec: TrackedRequest, steps: int) -> None:
    """Feed ``rec``'s prompt, then ``steps`` decode tokens, as the scheduler would."""
    rec.seq.sampling = engine.new_sampling(rec.config, rec.prompt_ids)
    for _ in range(steps + 1):
        step = rec.seq.next_step(64)
        assert kv.fit_step([rec], [(rec, step)]) == []
        out = engine.step([step])
        kv.after_step([(rec, step)])
        rec.seq.advance(step, out[0])


async def test_rollback_forgets_positions_and_never_offers_them_as_a_prefix(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """After rolling back two output positions, the sequence holds two fewer, and a prompt
    that continues past them matches only what was kept."""
    engine = FakeEngine(tiny[1], n_slots=2)
    kv = manager(engine, 1000)
    a = tracked(tiny[1], "a", prompt=6)
    assert kv.allocate(a, [])
    run(kv, engine, a, steps=4)  # prompt 6, then 4 outputs fed: 10 positions
    assert a.seq.num_computed == 10
    fed = list(a.seq.outputs)
    kv.rollback(a, 2)
    assert a.seq.num_computed == 8
    assert a.seq.outputs == fed[:2]
    assert kv.stats().running_tokens == 8
    with pytest.raises(ValueError, match="roll back"):
        kv.rollback(a, 3)
    kv.free(a)
    b = tracked(tiny[1], "b", prompt=6)
    b.prompt_ids = b.seq.prompt_ids = [*a.prompt_ids, *fed, 99]
    assert kv.preference(b) == 8  # the prompt and the two kept outputs, no more


async def test_a_prompt_that_does_not_fit_is_not_placed(tiny: tuple[LLaMAModel, Tokenizer]) -> None:
    """allocate refuses, changing nothing, a prompt the budget cannot hold beside the running
    sequences; cached prefixes of free slots make room instead of refusing."""
    engine = FakeEngine(tiny[1], n_slots=3)
    kv = manager(engine, 20)
    a = tracked(tiny[1], "a", prompt=12)
    assert kv.allocate(a, [])
    b = tracked(tiny[1], "b", prompt=12)
    assert not kv.allocate(b, [a])
    assert b.seq.slot == -1
    assert kv.stats().slots_used == 1
    run(kv, engine, a, steps=2)
    kv.free(a)  # its 14 positions stay cached for reuse
    assert kv.stats().cached_tokens == 14
    assert kv.allocate(b, [])  # the cached prefix is dropped to make room
    assert kv.stats().cached_tokens == 0
    kv.check()


async def test_preemption_order_is_lowest_priority_then_latest_admitted(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """When a step does not fit, the victims are the lowest priority first, then the most
    recently admitted; the highest-priority, oldest sequence is never among them."""
    engine = FakeEngine(tiny[1], n_slots=3)
    kv = manager(engine, 30, prefix_cache=False)
    recs = []
    for name, priority, admitted in (("old", 0, 1.0), ("new", 0, 2.0), ("low", 5, 0.5)):
        rec = tracked(tiny[1], name, prompt=9, priority=priority)
        rec.admitted = admitted
        assert kv.allocate(rec, recs)
        recs.append(rec)
    steps = [(r, r.seq.next_step(64)) for r in recs]
    assert kv.fit_step(recs, steps) == []  # 27 positions fit
    for (r, st), out in zip(steps, engine.step([s for _, s in steps]), strict=True):
        kv.after_step([(r, st)])
        r.seq.advance(st, out)
    for r in recs:
        r.seq.pending = [5, 6, 7, 8]  # four tokens each: 39 positions
    steps = [(r, r.seq.next_step(64)) for r in recs]
    victims = kv.fit_step(recs, steps)
    assert [v.id for v in victims] == ["low"]
    kv.preempt(victims[0])
    assert victims[0].seq.slot == -1
    assert victims[0].seq.num_computed == 0
    assert kv.stats().preemptions == 1
