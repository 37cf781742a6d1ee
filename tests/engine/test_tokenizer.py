"""Tokenizer built from GGUF metadata: special tokens, BOS rules, incremental detokenization,
SentencePiece byte fallback and the sandboxed chat template."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zigllama_batch import InvalidRequest, LLaMAModel, ModelLoadError, Tokenizer
from zigllama_batch.engine.gguf_loader import read_gguf_metadata

Tiny = tuple[LLaMAModel, Tokenizer]


def test_special_tokens_in_text_stay_single_tokens(tiny: Tiny) -> None:
    """<|im_start|> and <|im_end|> in any text encode to their own ids."""
    _, tok = tiny
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1
    assert ids[-1] == 2
    assert 1 not in ids[1:-1]
    assert 2 not in ids[1:-1]


def test_merges_apply(tiny: Tiny) -> None:
    """Byte-level BPE merges from the file are used ('Ġthe' is one token)."""
    _, tok = tiny
    ids = tok.encode(" the")
    assert [tok.token_to_str(i) for i in ids] == ["Ġthe"]


def test_bos_follows_metadata(write_gguf: Callable[..., Path]) -> None:
    """Plain text gets BOS only when the file says so (gpt2 default: no; llama default: yes)."""
    no_bos = Tokenizer(read_gguf_metadata(write_gguf("a.gguf")))
    with_bos = Tokenizer(read_gguf_metadata(write_gguf("b.gguf", add_bos=True)))
    spm = Tokenizer(read_gguf_metadata(write_gguf("c.gguf", vocab="spm")))
    assert no_bos.encode("hi")[0] != 1
    assert with_bos.encode("hi")[0] == 1
    assert spm.encode("hello")[0] == 1
    assert with_bos.encode("hi", add_bos=False)[0] != 1


def test_stop_ids_include_end_of_turn_tokens(tiny: Tiny) -> None:
    """EOS and well-known end-of-text control tokens end generation."""
    _, tok = tiny
    assert tok.eos_id == 2
    assert tok.stop_ids == {0, 2}


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_incremental_detokenizer_never_splits_a_character(tiny: Tiny, text: str) -> None:
    """Chunks are whole characters and join to the text, whatever the byte-level split."""
    _, tok = tiny
    ids = tok.encode(text)
    detok = tok.detokenizer()
    chunks = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace(
        "<|endoftext|>", ""
    )
    assert all("\ufffd" not in c for c in chunks) or "\ufffd" in text


def test_multibyte_character_is_held_until_complete(tiny: Tiny) -> None:
    """An emoji spread over four byte tokens comes out once, with its last byte."""
    _, tok = tiny
    ids = tok.encode("🙂")
    assert len(ids) == 4
    detok = tok.detokenizer()
    assert [detok.push(i) for i in ids] == ["", "", "", "🙂"]


def test_sentencepiece_vocabulary_with_byte_fallback(write_gguf: Callable[..., Path]) -> None:
    """A 'llama' vocabulary merges by score, falls back to bytes and decodes spaces back."""
    tok = Tokenizer(read_gguf_metadata(write_gguf(vocab="spm")))
    ids = tok.encode("hello world", add_bos=False)
    assert [tok.token_to_str(i) for i in ids] == ["▁hello", "▁world"]
    ids = tok.encode("héllo", add_bos=False)
    assert "<0xC3>" in [tok.token_to_str(i) for i in ids]
    assert tok.decode(ids) == "héllo"
    detok = tok.detokenizer()
    assert "".join(detok.push(i) for i in ids) + detok.flush() == " héllo"  # continuation text


def test_unsupported_vocabulary_kind() -> None:
    """A vocabulary kind other than gpt2/llama raises ModelLoadError."""
    with pytest.raises(ModelLoadError, match="'bert' is not supported"):
        Tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelLoadError, match="no tokenizer vocabulary"):
        Tokenizer({"tokenizer.ggml.model": "gpt2"})


def test_chat_template_renders_with_generation_prompt(tiny: Tiny) -> None:
    """Messages render through the file's template; the generation prompt is optional."""
    _, tok = tiny
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}
    ]
    assert tok.apply_chat_template(parts).endswith("user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_model_without_template_gets_chatml(write_gguf: Callable[..., Path]) -> None:
    """A file with no chat template falls back to ChatML."""
    tok = Tokenizer(read_gguf_metadata(write_gguf(chat_template=None)))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith(
        "<|im_start|>user\nx<|im_end|>"
    )


def test_gemma_vocabulary_without_template_gets_gemma_turns(
    write_gguf: Callable[..., Path],
) -> None:
    """A file with Gemma's turn tokens and no template renders Gemma's turns (a system message
    folded into the first user turn, the assistant called "model"), its BOS written once."""
    metadata = read_gguf_metadata(write_gguf(vocab="spm", chat_template=None))
    metadata["tokenizer.ggml.tokens"] = [*metadata["tokenizer.ggml.tokens"], "<start_of_turn>"]
    metadata["tokenizer.ggml.tokens"].append("<end_of_turn>")
    metadata["tokenizer.ggml.token_type"] = [*metadata["tokenizer.ggml.token_type"], 3, 3]
    metadata["tokenizer.ggml.scores"] = [*metadata["tokenizer.ggml.scores"], 0.0, 0.0]
    tok = Tokenizer(metadata)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.apply_chat_template(messages) == (
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    ids = tok.encode_prompt(messages)
    assert ids.count(tok.bos_id) == 1
    assert ids[0] == tok.bos_id
    assert tok.token_to_str(ids[1]) == "<start_of_turn>"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "user"}],
        [{"content": "x"}],
        [{"role": "user", "content": 3}],
        ["not a dict"],
        [{"role": "user", "content": [{"type": "image_url"}]}],
    ],
)
def test_malformed_messages_raise_invalid_request(tiny: Tiny, messages: object) -> None:
    """Messages that are not a list of {role, content} raise InvalidRequest."""
    _, tok = tiny
    with pytest.raises(InvalidRequest):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_chat_template_runs_sandboxed(write_gguf: Callable[..., Path]) -> None:
    """A template reaching for Python internals, or calling raise_exception, gets
    InvalidRequest; the sandbox blocks the access."""
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tok = Tokenizer(read_gguf_metadata(write_gguf("evil.gguf", chat_template=evil)))
    with pytest.raises(InvalidRequest, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    tok = Tokenizer(read_gguf_metadata(write_gguf("strict.gguf", chat_template=strict)))
    with pytest.raises(InvalidRequest, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_decode_rejects_ids_outside_vocabulary(tiny: Tiny) -> None:
    """Decoding an unknown id raises InvalidRequest."""
    _, tok = tiny
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        tok.decode([10_000])
