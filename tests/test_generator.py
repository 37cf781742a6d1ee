"""TextGenerator on the tiny model: results, streaming, callbacks, chat prompts and limits."""

from __future__ import annotations

import numpy as np
import pytest

from zigllama_batch import (
    FinishReason,
    GenerationConfig,
    InvalidRequest,
    LLaMAModel,
    PromptTooLong,
    TextGenerator,
    Tokenizer,
)
from zigllama_batch.engine import SequenceStep

Tiny = tuple[LLaMAModel, Tokenizer]


def test_greedy_generation_follows_the_model_argmax(tiny: Tiny) -> None:
    """Each greedy token is the argmax of the model's logits given everything before it."""
    model, tok = tiny
    result = TextGenerator(model, tok).generate(
        "the cat", GenerationConfig.greedy(max_tokens=12, ignore_eos=True)
    )
    ids = tok.encode("the cat")
    cache = model.new_cache(1, 64)
    logits = model.step([SequenceStep(0, ids, 0)], cache)[0]
    expected = []
    for i in range(12):
        expected.append(int(logits.argmax()))
        logits = model.step([SequenceStep(0, [expected[-1]], len(ids) + i)], cache)[0]
    assert list(result.token_ids) == expected
    assert result.completion_tokens == 12
    assert result.prompt_tokens == len(ids)
    assert result.finish_reason == FinishReason.LENGTH
    assert result.text == tok.decode(expected)
    assert 0 < result.time_to_first_token_ms <= result.total_time_ms


def test_stream_and_callback_see_the_same_text_as_generate(tiny: Tiny) -> None:
    """Streamed chunks and callback chunks join to generate()'s text; one callback per token."""
    model, tok = tiny
    gen = TextGenerator(model, tok)
    config = GenerationConfig(max_tokens=20, seed=3, ignore_eos=True)
    seen: list[tuple[str, int]] = []
    result = gen.generate("she and", config, callback=lambda c, t: seen.append((c, t)))
    assert "".join(gen.stream("she and", config)) == result.text
    assert "".join(c for c, _ in seen) == result.text
    assert [t for _, t in seen] == list(result.token_ids)


def test_seeded_sampling_is_reproducible(tiny: Tiny) -> None:
    """The same seed gives the same tokens; a different seed (almost surely) does not."""
    model, tok = tiny
    gen = TextGenerator(model, tok)
    cfg = GenerationConfig(temperature=5.0, top_k=0, top_p=1.0, max_tokens=16, ignore_eos=True)
    a = gen.generate("of the", cfg.with_(seed=5)).token_ids
    assert gen.generate("of the", cfg.with_(seed=5)).token_ids == a
    assert gen.generate("of the", cfg.with_(seed=6)).token_ids != a


def test_chat_messages_are_rendered_with_the_template(tiny: Tiny) -> None:
    """A message list is rendered with the chat template plus generation prompt, no extra BOS."""
    model, tok = tiny
    msgs = [{"role": "user", "content": "hi"}]
    result = TextGenerator(model, tok).generate(msgs, GenerationConfig.greedy(max_tokens=2))
    assert result.prompt_tokens == len(tok.encode(tok.apply_chat_template(msgs)))


def test_logprobs_are_returned_when_asked(tiny: Tiny) -> None:
    """logprobs=True returns one finite, non-positive value per generated token."""
    model, tok = tiny
    r = TextGenerator(model, tok).generate(
        "a", GenerationConfig(max_tokens=5, seed=1, logprobs=True, ignore_eos=True)
    )
    assert r.logprobs is not None
    assert len(r.logprobs) == 5
    assert all(np.isfinite(x) and x <= 0 for x in r.logprobs)
    assert TextGenerator(model, tok).generate("a", GenerationConfig(max_tokens=2)).logprobs is None


def test_prompt_longer_than_context_raises(tiny: Tiny) -> None:
    """A prompt that leaves no room for output raises PromptTooLong with the figures."""
    model, tok = tiny
    gen = TextGenerator(model, tok, max_context=32)
    with pytest.raises(PromptTooLong) as info:
        gen.generate("x" * 40)
    assert (info.value.prompt_tokens, info.value.max_context) == (40, 32)
    assert isinstance(info.value, InvalidRequest)
    assert isinstance(info.value, ValueError)
    r = gen.generate("x" * 30, GenerationConfig.greedy(max_tokens=100, ignore_eos=True))
    assert r.finish_reason == FinishReason.LENGTH
    assert r.completion_tokens == 2
    assert gen.slots.n_free == 1  # the slot is given back after every run


def test_long_prompt_is_prefilled_in_chunks(tiny: Tiny) -> None:
    """A prompt of several prefill chunks gives the same tokens as one prefill step."""
    model, tok = tiny
    text = "the cat sat on the mat and she ran off " * 4
    assert len(tok.encode(text)) > 4 * 16
    config = GenerationConfig.greedy(max_tokens=5, ignore_eos=True)
    whole = TextGenerator(model, tok).generate(text, config).token_ids
    assert TextGenerator(model, tok, prefill_chunk=16).generate(text, config).token_ids == whole
