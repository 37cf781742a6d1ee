"""SequenceState: how a sequence's prompt is chunked into steps and its decode tokens fed."""

from __future__ import annotations

from zigllama_batch import GenerationConfig
from zigllama_batch.engine import SamplingState, SequenceState, TokenSample


def test_prompt_is_fed_in_chunks_and_only_the_last_samples() -> None:
    """Chunks of at most the budget, in order; only the step completing the prompt carries
    the sampling state, and each step starts where the last one ended."""
    sampling = SamplingState(GenerationConfig.greedy(), [], 100)
    seq = SequenceState(list(range(10)), slot=3, sampling=sampling)
    steps = []
    while seq.prefilling:
        step = seq.next_step(4)
        steps.append(step)
        seq.advance(step, TokenSample(42, 0.0) if step.sampling else None)
    assert [list(s.token_ids) for s in steps] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [s.start_pos for s in steps] == [0, 4, 8]
    assert [s.sampling is sampling for s in steps] == [False, False, True]
    assert {s.slot for s in steps} == {3}
    assert seq.num_computed == 10


def test_after_the_prompt_each_step_feeds_the_last_sampled_token() -> None:
    """A decode step feeds the token sampled by the step before, at the next position, and
    always samples."""
    sampling = SamplingState(GenerationConfig.greedy(), [], 100)
    seq = SequenceState([5, 6], slot=0, sampling=sampling)
    first = seq.next_step(512)
    seq.advance(first, TokenSample(7, 0.0))
    second = seq.next_step(512)
    assert (list(second.token_ids), second.start_pos, second.sampling) == ([7], 2, sampling)
    seq.advance(second, TokenSample(8, 0.0))
    third = seq.next_step(1)
    assert (list(third.token_ids), third.start_pos) == ([8], 3)
    assert not seq.prefilling
