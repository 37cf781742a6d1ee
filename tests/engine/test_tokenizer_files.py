"""The tokenizer exported as Hugging Face files: read back by the `tokenizers` library (and by
transformers, where it is installed), it gives the ids and text our tokenizer gives."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer

from zigllama_batch import Tokenizer
from zigllama_batch.cli import main
from zigllama_batch.engine.gguf_loader import read_gguf_metadata
from zigllama_batch.engine.hub import model_path
from zigllama_batch.engine.tokenizer_files import TOKENIZER_FILES, save_tokenizer_files

REF = Path(__file__).parent / "reference"

TEXTS = [
    "Hello, world!",
    "",
    " leading space, trailing space ",
    "naïve café, Größe, 東京, Привет, مرحبا",
    "emoji: 👍🏽 🧑‍🚀 🇫🇷 done",
    "def square(x):\n    return x ** 2  # tabs\tand   runs of spaces\n",
    "12345 3.14159 2026-12-07",
    "<|im_start|>user\nhi<|im_end|>\n<start_of_turn>model\n",
]
"""ASCII, unicode, emoji, code and whitespace, numbers, and control tokens in plain text."""

CHATS = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors 🎨."},
        {"role": "assistant", "content": "Red, yellow, blue."},
        {"role": "user", "content": "def f(): pass"},
    ],
]


def _export(tokenizer: Tokenizer, directory: Path) -> HFTokenizer:
    save_tokenizer_files(tokenizer, directory)
    return HFTokenizer.from_file(str(directory / "tokenizer.json"))


def _assert_same_ids_and_text(ours: Tokenizer, theirs: HFTokenizer) -> None:
    """Every text and rendered chat encodes to our ids and decodes to our text."""
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text).ids == ids, text
        assert theirs.decode(ids) == ours.decode(ids), text
        kept = theirs.decode(ids, skip_special_tokens=False)
        assert kept == ours.decode(ids, skip_special_tokens=False), text
    for messages in CHATS:
        rendered = ours.apply_chat_template(messages)
        ids = ours.encode_prompt(messages)
        assert theirs.encode(rendered, add_special_tokens=False).ids == ids, rendered
        kept = theirs.decode(ids, skip_special_tokens=False)
        assert kept == ours.decode(ids, skip_special_tokens=False), rendered


@pytest.mark.parametrize("vocab", ["gpt2", "spm"])
def test_exported_files_encode_and_decode_as_we_do(
    write_gguf: Callable[..., Path], tmp_path: Path, vocab: str
) -> None:
    """Byte-level BPE and SentencePiece vocabularies, BOS added or not, read back by the
    tokenizers library, give our ids and our text."""
    for add_bos in (None, True):
        ours = Tokenizer(
            read_gguf_metadata(write_gguf(f"{vocab}.gguf", vocab=vocab, add_bos=add_bos))
        )
        theirs = _export(ours, tmp_path / f"{vocab}-{add_bos}")
        _assert_same_ids_and_text(ours, theirs)


def test_the_config_names_the_special_tokens_and_the_chat_template(
    write_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    """tokenizer_config.json and special_tokens_map.json carry what transformers reads beside
    tokenizer.json: the fast class, BOS/EOS (and the other tokens the file names), whether BOS
    is added, the chat template and the context length."""
    ours = Tokenizer(read_gguf_metadata(write_gguf(add_bos=True)))
    written = save_tokenizer_files(ours, tmp_path / "out", model_max_length=256)
    assert [p.name for p in written] == list(TOKENIZER_FILES)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    special = json.loads((tmp_path / "out" / "special_tokens_map.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == ours.chat_template
    assert config["add_bos_token"] is True
    assert config["model_max_length"] == 256
    assert config["clean_up_tokenization_spaces"] is False
    assert special["bos_token"] == ours.token_to_str(ours.bos_id or 0)
    assert special["eos_token"] == ours.token_to_str(ours.eos_id or 0)
    assert {k: config[k] for k in special} == special


def test_export_command_writes_the_files(
    tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`zigllama-batch tokenizer export DIR --model M` writes the three files, with the model's
    context as the longest input, and says how to load them."""
    assert main(["tokenizer", "export", str(tmp_path / "tok"), "--model", str(tiny_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(TOKENIZER_FILES)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 256
    out = capsys.readouterr().out
    assert "AutoTokenizer.from_pretrained(" in out
    assert "guidellm --processor" in out


def test_export_of_an_unknown_model_lists_the_names(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --model exits 1 with the names that work, writing nothing."""
    assert main(["tokenizer", "export", "/nonexistent/dir", "--model", "smollm3"]) == 1
    assert "no model is named 'smollm3'" in capsys.readouterr().err
    assert not Path("/nonexistent/dir").exists()


def _real_tokenizer(name: str) -> tuple[Tokenizer, int]:
    """A packaged model's tokenizer and context length, from its metadata (no tensor read)."""
    metadata = read_gguf_metadata(model_path(name, progress=False))
    context = int(metadata[f"{metadata['general.architecture']}.context_length"])
    return Tokenizer(metadata), context


def _transformers_ids(result: Any) -> list[int]:
    """apply_chat_template's ids, whether it returns a list or a BatchEncoding."""
    ids = result["input_ids"] if isinstance(result, Mapping) else result
    return list(ids)


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("name", "reference"),
    [("smollm2-135m", "smollm2_tokenizer.json"), ("gemma-3-270m", "gemma3_270m_tokenizer.json")],
)
def test_real_tokenizers_export_exactly(name: str, reference: str, tmp_path: Path) -> None:
    """SmolLM2's byte-level BPE and Gemma 3's SentencePiece vocabulary, exported and read back
    by the tokenizers library, give our ids and text for unicode, emoji, code and the chat
    template's control tokens, and transformers' own ids for the reference cases."""
    ours, context = _real_tokenizer(name)
    save_tokenizer_files(ours, tmp_path, model_max_length=context)
    theirs = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    _assert_same_ids_and_text(ours, theirs)
    for case in json.loads((REF / reference).read_text())["encode"]:
        assert theirs.encode(case["text"], add_special_tokens=False).ids == case["ids"]


@pytest.mark.parametrize("vocab", ["gpt2", "spm"])
def test_transformers_reads_a_tiny_export_as_we_tokenize(
    write_gguf: Callable[..., Path], tmp_path: Path, vocab: str
) -> None:
    """Where transformers is installed: its AutoTokenizer reads the tiny vocabularies' export
    as we tokenize."""
    ours = Tokenizer(read_gguf_metadata(write_gguf(vocab=vocab)))
    _assert_transformers_agrees(ours, 256, tmp_path)


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma-3-270m"])
def test_transformers_reads_the_export_as_we_tokenize(name: str, tmp_path: Path) -> None:
    """Where transformers is installed: its AutoTokenizer reads SmolLM2's and Gemma 3's
    export as we tokenize."""
    _assert_transformers_agrees(*_real_tokenizer(name), tmp_path)


def _assert_transformers_agrees(ours: Tokenizer, context: int, directory: Path) -> None:
    """transformers' AutoTokenizer, given the exported directory, encodes text and renders and
    encodes chats to our ids, and knows the special tokens and the context length."""
    transformers = pytest.importorskip("transformers")
    save_tokenizer_files(ours, directory, model_max_length=context)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text), text
        ids = ours.encode(text)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
    for messages in CHATS:
        rendered = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == ours.apply_chat_template(messages)
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert _transformers_ids(ids) == ours.encode_prompt(messages)
    assert theirs.model_max_length == context
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)
