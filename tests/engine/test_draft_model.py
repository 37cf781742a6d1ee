"""The draft model's proposals: the model's own greedy continuation, whether its slot catches up
in one feed or in chunks, and for several sequences at once."""

from __future__ import annotations

from tiny_gguf import greedy_tokens

from zigllama_batch import LLaMAModel, Tokenizer
from zigllama_batch.engine import DraftItem, DraftModel
from zigllama_batch.engine.draft_model import check_draft_model

Tiny = tuple[LLaMAModel, Tokenizer]


def test_a_proposal_is_the_models_greedy_continuation(tiny: Tiny) -> None:
    """k drafted tokens equal the model's k greedy tokens after the prompt, fed at once."""
    model, tokenizer = tiny
    prompt = tokenizer.encode("she said hello and he said")
    draft = DraftModel(model, n_slots=2, max_context=64)
    (proposal,) = draft.propose([DraftItem(1, prompt, 0, 5)])
    assert proposal == greedy_tokens(model, prompt, 5, 64)


def test_a_catch_up_in_chunks_then_a_proposal_for_two_sequences(tiny: Tiny) -> None:
    """A prompt fed in two calls (the first drafting nothing), beside another sequence's
    proposal of another length, gives each its greedy continuation."""
    model, tokenizer = tiny
    a, b = tokenizer.encode("one two three one two"), tokenizer.encode("a b c d")
    draft = DraftModel(model, n_slots=2, max_context=64)
    first = draft.propose([DraftItem(0, a[:3], 0, 0), DraftItem(1, b, 0, 2)])
    assert first == [[], greedy_tokens(model, b, 2, 64)]
    (rest,) = draft.propose([DraftItem(0, a[3:], 3, 4)])
    assert rest == greedy_tokens(model, a, 4, 64)


def test_a_draft_model_sharing_the_vocabulary_passes_the_check(tiny: Tiny) -> None:
    """The target itself is a draft model of its own vocabulary."""
    model, tokenizer = tiny
    check_draft_model(tiny, tokenizer=tokenizer, vocab_size=model.config.vocab_size)
