"""OutputDecoder: stop tokens, stop strings (never emitted, even split across tokens),
max_tokens and the context limit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zigllama_batch import FinishReason, GenerationConfig, LLaMAModel, Tokenizer
from zigllama_batch.engine import OutputDecoder

Tiny = tuple[LLaMAModel, Tokenizer]


def _run(tok: Tokenizer, text: str, **cfg: object) -> tuple[list[str], OutputDecoder]:
    config = GenerationConfig.greedy(**{"max_tokens": 1000, **cfg})
    decoder = OutputDecoder(tok, config, prompt_tokens=3, max_context=10_000)
    chunks = []
    for t in tok.encode(text):
        chunks.append(decoder.add(t))
        if decoder.finished:
            break
    return chunks, decoder


def test_stop_string_split_across_tokens_is_never_emitted(tiny: Tiny) -> None:
    """A stop string spread over several byte tokens ends the text before it, unseen."""
    _, tok = tiny
    chunks, d = _run(tok, "hello world STOP and more", stop=["STOP"])
    assert d.finish_reason == FinishReason.STOP
    assert "".join(chunks) == d.text == "hello world "
    assert not any("S" in c for c in chunks)


def test_false_start_of_a_stop_string_is_released(tiny: Tiny) -> None:
    """Text held back because it might start a stop string comes out once it cannot."""
    _, tok = tiny
    text = "a STAR is born"
    chunks, d = _run(tok, text, stop=["STOP"], max_tokens=len(tok.encode(text)))
    assert "".join(chunks) == d.text == "a STAR is born"
    assert d.finish_reason == FinishReason.LENGTH


@settings(max_examples=100, deadline=None)
@given(
    st.text(alphabet="abc XYZ\n", max_size=30),
    st.lists(st.text(alphabet="abcXYZ \n", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_text_never_contains_a_stop_string(tiny: Tiny, text: str, stops: list[str]) -> None:
    """Output is a prefix of the text, holds no stop string, and is cut right before one."""
    _, tok = tiny
    chunks, d = _run(tok, text, stop=stops, max_tokens=len(tok.encode(text)) or 1)
    assert "".join(chunks) == d.text
    assert text.startswith(d.text)
    assert not any(s in d.text for s in stops)
    if any(s in text for s in stops):
        assert d.finish_reason == FinishReason.STOP
        assert any(text[len(d.text) :].startswith(s) for s in stops)
    elif text:
        assert d.text == text


def test_eos_ends_without_text_unless_ignored(tiny: Tiny) -> None:
    """The EOS token ends generation with no text; with ignore_eos it does not end it."""
    _, tok = tiny
    d = OutputDecoder(tok, GenerationConfig.greedy(), prompt_tokens=1, max_context=100)
    assert d.add(tok.encode("a")[0]) == "a"
    assert d.add(2) == ""
    assert d.finish_reason == FinishReason.STOP
    assert d.token_ids == [tok.encode("a")[0], 2]
    d = OutputDecoder(
        tok, GenerationConfig.greedy(ignore_eos=True), prompt_tokens=1, max_context=100
    )
    d.add(2)
    assert not d.finished


def test_stop_token_ids_end_generation(tiny: Tiny) -> None:
    """A token listed in stop_token_ids ends generation and releases held text."""
    _, tok = tiny
    d = OutputDecoder(
        tok,
        GenerationConfig.greedy(stop_token_ids=[5], stop=["ab"]),
        prompt_tokens=1,
        max_context=100,
    )
    assert d.add(tok.encode("a")[0]) == ""  # might start "ab"
    assert d.add(5) == "a"
    assert d.finish_reason == FinishReason.STOP


def test_max_tokens_and_context_limit(tiny: Tiny) -> None:
    """Generation stops at max_tokens, or when prompt + output fill the context."""
    _, tok = tiny
    x = tok.encode("x")[0]
    d = OutputDecoder(tok, GenerationConfig.greedy(max_tokens=2), prompt_tokens=1, max_context=100)
    d.add(x)
    d.add(x)
    assert d.finish_reason == FinishReason.LENGTH
    d = OutputDecoder(tok, GenerationConfig.greedy(max_tokens=50), prompt_tokens=8, max_context=10)
    d.add(x)
    assert not d.finished
    d.add(x)
    assert d.finish_reason == FinishReason.LENGTH
    with pytest.raises(RuntimeError, match="already finished"):
        d.add(x)


@pytest.mark.parametrize(("max_tokens", "max_context"), [(2, 100), (50, 3)])
def test_a_constraint_completed_by_the_last_allowed_token_ends_with_stop(
    tiny: Tiny, max_tokens: int, max_context: int
) -> None:
    """Output that a constraint's last token completes is whole: stop, even when that token
    is the last max_tokens or the context allows."""
    _, tok = tiny
    x = tok.encode("x")[0]
    d = OutputDecoder(
        tok, GenerationConfig.greedy(max_tokens=max_tokens), prompt_tokens=1,
        max_context=max_context,
    )  # fmt: skip
    d.add(x)
    d.add(x, completes=True)
    assert d.finish_reason == FinishReason.STOP
    assert d.text == "xx"


def test_the_result_is_the_finished_output(tiny: Tiny) -> None:
    """result() gives text, tokens, reason, counts and logprobs of the finished sequence with
    the timings passed in, and refuses an unfinished one."""
    _, tok = tiny
    config = GenerationConfig.greedy(max_tokens=3, logprobs=True)
    decoder = OutputDecoder(tok, config, prompt_tokens=7, max_context=100)
    ids = tok.encode("abc")[:3]
    decoder.add(ids[0], -0.5)
    with pytest.raises(RuntimeError, match="not finished"):
        decoder.result(time_to_first_token_ms=1.0, total_time_ms=2.0)
    decoder.add(ids[1], -1.0)
    decoder.add(ids[2], -1.5)
    r = decoder.result(time_to_first_token_ms=1.0, total_time_ms=2.0)
    assert (r.text, r.token_ids, r.finish_reason) == (decoder.text, tuple(ids), "length")
    assert (r.prompt_tokens, r.completion_tokens) == (7, 3)
    assert (r.time_to_first_token_ms, r.total_time_ms) == (1.0, 2.0)
    assert r.logprobs == (-0.5, -1.0, -1.5)
