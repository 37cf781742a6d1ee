"""Prompt logprobs on the engine side: each prompt token's log-probability given the ones before
it equals a log-softmax of an independent whole-prompt forward pass, whatever the chunking; the
alternatives are the most likely tokens; a sequence of ``max_tokens`` 0 computes its prompt
and generates nothing; scores are gathered once per position and never over a reused prefix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import TinySpec, reference_logits

from zigllama_batch import (
    FinishReason,
    GenerationConfig,
    LLaMAModel,
    TextGenerator,
    Tokenizer,
    TokenLogprob,
)
from zigllama_batch.engine import Engine, PromptScores, SequenceState, SequenceStep
from zigllama_batch.engine.scoring import token_logprobs

Tiny = tuple[LLaMAModel, Tokenizer]

TEXT = "the cat sat on the mat and the dog ran off to see the hat"


def reference_logprobs(path: Path, ids: list[int]) -> np.ndarray:
    """Log-softmax of a float64 Hugging Face-style forward pass over the whole prompt:
    ``(len(ids), vocab)``, row p the distribution of the token after position p."""
    logits = reference_logits(path, TinySpec(), ids)
    peak = logits.max(axis=1, keepdims=True)
    return logits - (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))


@pytest.mark.parametrize("chunk", [1, 3, 7, 512])
def test_prompt_logprobs_equal_a_whole_prompt_forward_pass_whatever_the_chunking(
    tiny: Tiny, tiny_path: Path, chunk: int
) -> None:
    """Prompt token p's logprob is the reference's row p - 1 at that token (within 1e-4),
    the first token has none, and the top alternatives are the reference's best, in order."""
    model, tok = tiny
    ids = tok.encode(TEXT)
    want = reference_logprobs(tiny_path, ids)
    result = TextGenerator(model, tok, prefill_chunk=chunk).generate(
        ids, GenerationConfig.greedy(max_tokens=2, prompt_logprobs=3)
    )
    scores = result.prompt_logprobs
    assert scores is not None
    assert len(scores) == len(ids)
    assert scores[0] is None
    for p, score in enumerate(scores[1:], start=1):
        assert isinstance(score, TokenLogprob)
        assert score.token_id == ids[p]
        assert score.logprob == pytest.approx(want[p - 1, ids[p]], abs=1e-4)
        best = np.argsort(-want[p - 1], kind="stable")[:3]
        assert [t for t, _ in score.top] == best.tolist()
        np.testing.assert_allclose([lp for _, lp in score.top], want[p - 1, best], atol=1e-4)
    assert len(result.token_ids) == 2  # generation goes on as usual after the prompt


def test_max_tokens_zero_runs_the_prompt_and_generates_nothing(tiny: Tiny, tiny_path: Path) -> None:
    """With max_tokens 0 the result has no tokens and no text, ends with ``length``, and
    still carries the prompt's logprobs (the same as when tokens follow)."""
    model, tok = tiny
    ids = tok.encode(TEXT)
    generator = TextGenerator(model, tok, prefill_chunk=5)
    empty = generator.generate(ids, GenerationConfig.greedy(max_tokens=0, prompt_logprobs=0))
    assert empty.token_ids == ()
    assert empty.text == ""
    assert empty.finish_reason is FinishReason.LENGTH
    assert empty.completion_tokens == 0
    assert empty.prompt_tokens == len(ids)
    scores = empty.prompt_logprobs
    assert scores is not None
    assert len(scores) == len(ids)
    want = reference_logprobs(tiny_path, ids)
    got = [s.logprob for s in scores[1:] if s is not None]
    np.testing.assert_allclose(got, want[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    assert all(s.top == () for s in scores[1:] if s is not None)
    # Without prompt logprobs, max_tokens 0 is an empty generation all the same.
    plain = generator.generate(ids, GenerationConfig.greedy(max_tokens=0))
    assert plain.token_ids == ()
    assert plain.prompt_logprobs is None


def test_a_generated_tokens_logprob_is_its_score_as_a_prompt_token(tiny: Tiny) -> None:
    """The sampler and prompt scoring compute a logprob the same way: a generated token's
    logprob equals its score once it is fed back as part of the prompt (within 1e-4)."""
    model, tok = tiny
    ids = tok.encode(TEXT)
    generator = TextGenerator(model, tok)
    first = generator.generate(ids, GenerationConfig.greedy(max_tokens=3, logprobs=True))
    assert first.logprobs is not None
    again = generator.generate(
        [*ids, *first.token_ids], GenerationConfig.greedy(max_tokens=0, prompt_logprobs=0)
    )
    assert again.prompt_logprobs is not None
    fed_back = [s.logprob for s in again.prompt_logprobs[len(ids) :] if s is not None]
    np.testing.assert_allclose(fed_back, first.logprobs, atol=1e-4)


def test_a_scored_item_samples_as_an_unscored_one_beside_a_decode_item(tiny: Tiny) -> None:
    """In one step beside a decode item, a scored prompt chunk gets a logits row per position
    while both items sample the tokens they would without scoring."""
    model, tok = tiny
    prompt = tok.encode(TEXT)
    other = tok.encode("a b c")
    config = GenerationConfig.greedy(max_tokens=4)
    samples = []
    for scored in (False, True):
        engine = Engine(model, tok, n_slots=2, max_context=64)
        decode = SequenceState(other, slot=1, sampling=engine.new_sampling(config, other))
        first = decode.next_step(64)
        decode.advance(first, engine.step([first])[0])
        scores = PromptScores(prompt, 2) if scored else None
        seq = SequenceState(
            prompt, slot=0, sampling=engine.new_sampling(config, prompt), scores=scores
        )
        step = seq.next_step(64)
        assert step.logit_rows == (len(prompt) if scored else 1)
        samples.append([out.token_id for out in engine.step([step, decode.next_step(1)]) if out])
        if scores is not None:
            assert scores.complete
            assert len(scores.result()) == len(prompt)
    assert len(samples[0]) == 2
    assert samples[0] == samples[1]


def test_scores_are_kept_once_per_position_and_never_skip_a_prefix() -> None:
    """Positions scored again (a recomputed prompt) keep their first scores; a step that
    starts past the scored positions is refused, and a scored sequence reuses no prefix."""
    vocab, prompt = 8, [1, 2, 3, 4, 5]
    first, second = np.random.default_rng(0).normal(size=(2, 5, vocab)).astype(np.float32)
    scores = PromptScores(prompt, 1)
    scores.score(0, first[:2])  # positions 0, 1 score tokens 2 and 3
    assert not scores.complete
    scores.score(0, second[:3])  # 0 and 1 again (kept as they were), and position 2 anew
    with pytest.raises(ValueError, match="have no scores"):
        scores.score(4, second[4:])
    scores.score(3, second[3:])  # its last row has no prompt token after it
    assert scores.complete
    got = [s.logprob for s in scores.result()[1:] if s is not None]
    want = np.concatenate(
        [
            token_logprobs(first[:2], np.array(prompt[1:3]))[0],
            token_logprobs(second[2:4], np.array(prompt[3:]))[0],
        ]
    )
    np.testing.assert_array_equal(got, want)
    seq = SequenceState(prompt, scores=PromptScores(prompt, 0))
    assert not seq.may_reuse_prefix
    with pytest.raises(ValueError, match="cannot reuse"):
        seq.reuse_prefix(2)
    step = seq.next_step(3)
    assert step.scores is seq.scores
    assert step.sampling is None
    assert SequenceStep(0, [1, 2, 3], 0, draft=1).logit_rows == 2
