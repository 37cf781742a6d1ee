"""A model's tokenizer as the files Hugging Face ``transformers`` and ``tokenizers`` read.

Inside: :func:`save_tokenizer_files`, which writes three files to a directory:

- ``tokenizer.json``: the ``tokenizers`` definition :class:`~.tokenizer.Tokenizer` runs on
  (vocabulary, merges, pre-tokenizer, decoder, special tokens), with a post-processor that
  starts a text with the BOS token where the model's metadata says plain text starts with one
  (Gemma, Llama 2), so ``encode(text)`` gives the ids :meth:`Tokenizer.encode` gives;
- ``tokenizer_config.json``: the fast tokenizer class that reads it, the chat template, the
  special tokens, and the context length;
- ``special_tokens_map.json``: the special tokens again, for older readers.

Tools that take a tokenizer by directory, such as ``AutoTokenizer.from_pretrained(DIR)`` or
guidellm's ``--processor DIR``, then count and split text as this library does.

Left out: a slow (Python) tokenizer, ``generation_config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from .tokenizer import Tokenizer

__all__ = ["TOKENIZER_FILES", "save_tokenizer_files"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
"""The files :func:`save_tokenizer_files` writes, in that order."""


def save_tokenizer_files(
    tokenizer: Tokenizer,
    directory: str | os.PathLike[str],
    *,
    model_max_length: int | None = None,
) -> list[Path]:
    """Write ``tokenizer`` to ``directory`` (created if missing) as :data:`TOKENIZER_FILES`.

    Args:
        tokenizer: the model's tokenizer.
        directory: where to write; files of the same names are replaced.
        model_max_length: the model's context length, which readers take as the longest input
            (omitted when None).

    Returns:
        The paths written.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in TOKENIZER_FILES]
    _with_bos(tokenizer).save(str(paths[0]))
    special = _special_tokens(tokenizer)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        # Decoded text is the model's bytes as they are: no spaces dropped before punctuation.
        "clean_up_tokenization_spaces": False,
        "chat_template": tokenizer.chat_template,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    _write_json(paths[1], config)
    _write_json(paths[2], special)
    return paths


def _with_bos(tokenizer: Tokenizer) -> HFTokenizer:
    """The tokenizer's ``tokenizers`` definition, adding its BOS token where it adds one."""
    hf = HFTokenizer.from_str(tokenizer.hf_json())
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        bos = tokenizer.token_to_str(tokenizer.bos_id)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer.bos_id)],
        )
    return hf


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The special tokens the metadata names, as ``transformers`` keys them."""
    named = {
        "bos_token": tokenizer.bos_id,
        "eos_token": tokenizer.eos_id,
        "unk_token": tokenizer.unk_id,
        "pad_token": tokenizer.pad_id,
    }
    return {key: tokenizer.token_to_str(i) for key, i in named.items() if i is not None}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
