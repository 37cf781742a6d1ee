"""Result assembly alone: a finished request's output and the processor's timings."""

from __future__ import annotations

import pytest
from batch_helpers import tracked

from zigllama_batch import FinishReason, LLaMAModel, Tokenizer
from zigllama_batch.batching.results import batch_result
from zigllama_batch.engine import TokenSample

Tiny = tuple[LLaMAModel, Tokenizer]


async def test_a_result_carries_the_output_and_exact_timings(tiny: Tiny) -> None:
    """Latency, queue time and time to first token are differences of the clock times the
    request recorded; the output is the decoder's; batch_size is the largest batch it ran in."""
    tok = tiny[1]
    rec = tracked(tok, "r", max_tokens=2)
    rec.admitted = 0.25
    ids = tok.encode("cat")[:1] * 2
    rec.accept(TokenSample(ids[0], float("nan")), now=0.5)
    rec.accept(TokenSample(ids[1], float("nan")), now=0.75)
    rec.steps, rec.batch_sizes = 3, [1, 4, 2]
    result = batch_result(rec, finished=1.0)
    assert (result.latency_ms, result.queue_time_ms, result.time_to_first_token_ms) == (
        pytest.approx(1000.0),
        pytest.approx(250.0),
        pytest.approx(500.0),
    )
    assert result.batch_size == 4
    assert result.timeline.batch_sizes == (1, 4, 2)
    assert result.timeline.steps == 3
    g = result.result
    assert g.token_ids == tuple(ids)
    assert g.finish_reason == FinishReason.LENGTH
    assert (g.prompt_tokens, g.completion_tokens) == (5, 2)
    assert g.text == rec.decoder.text
    assert g.total_time_ms == result.latency_ms
    assert g.logprobs is None
