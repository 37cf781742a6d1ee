"""The real Gemma 3 270M (packaged model ``gemma-3-270m``) against transformers on torch.

The fixtures were computed once by ``reference/make_gemma_reference.py`` from the same GGUF
file. Prompt 3 is 930 tokens long: past the 512-position window of the model's local layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import greedy_tokens

from zigllama_batch import LLaMAModel, Tokenizer, load_model
from zigllama_batch.engine import SequenceStep

pytestmark = pytest.mark.real_model

REF = Path(__file__).parent / "reference"
Gemma = tuple[LLaMAModel, Tokenizer]


@pytest.fixture(scope="module")
def gemma() -> Gemma:
    """Gemma 3 270M, fetched into the cache on first use."""
    return load_model("gemma-3-270m", progress=False)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REF / "gemma3_270m_reference.npz") as data:
        return dict(data)


def test_the_packaged_model_is_gemma3_with_its_window(gemma: Gemma) -> None:
    """The file loads as Gemma 3: 18 layers, 256-wide heads, a window of 512 on 5 layers in 6."""
    c = gemma[0].config
    assert c.architecture.name == "gemma3"
    assert (c.n_layers, c.dim, c.head_dim, c.vocab_size) == (18, 640, 256, 262144)
    assert [c.window(i) for i in range(6)] == [512] * 5 + [None]


@pytest.mark.parametrize("prompt", range(4))
def test_teacher_forced_logits_match_transformers(
    gemma: Gemma, ref: dict[str, np.ndarray], prompt: int
) -> None:
    """Max |logit difference| < 1e-3 at the prompt's end and every generated position (the
    prompt as one prefill, then token by token), on 256 fixed columns and the reference's top
    16 at each position."""
    model, _ = gemma
    prompt_ids = ref[f"prompt{prompt}_ids"].tolist()
    seq = ref[f"seq{prompt}_ids"].tolist()
    cols = ref["cols"]
    cache = model.new_cache(1, 1024)
    logits = {len(prompt_ids) - 1: model.step([SequenceStep(0, prompt_ids, 0)], cache)[0]}
    for pos in range(len(prompt_ids), len(seq)):
        logits[pos] = model.step([SequenceStep(0, [seq[pos]], pos)], cache)[0]
    worst = max(
        max(
            float(np.abs(row[cols] - ref[f"sub{prompt}_logits"][pos]).max()),
            float(
                np.abs(row[ref[f"top{prompt}_ids"][pos]] - ref[f"top{prompt}_logits"][pos]).max()
            ),
        )
        for pos, row in logits.items()
    )
    assert worst < 1e-3


@pytest.mark.parametrize("prompt", range(4))
def test_greedy_tokens_match_until_a_near_tie(
    gemma: Gemma, ref: dict[str, np.ndarray], prompt: int
) -> None:
    """Greedy generation through the KV cache equals the reference's up to its first step with
    a top-2 gap < 0.01, from the prompt text tokenized here."""
    model, tok = gemma
    text = json.loads(str(ref["meta"]))["prompts"][prompt]
    prompt_ids = tok.encode(text)
    assert prompt_ids == ref[f"prompt{prompt}_ids"].tolist()
    want = ref[f"greedy{prompt}_ids"].tolist()
    gaps = ref[f"greedy{prompt}_top2_gap"]
    agree = int(np.argmax(gaps < 0.01)) if (gaps < 0.01).any() else len(want)
    got = greedy_tokens(model, prompt_ids, len(want), 1024)
    assert got[: agree + 1] == want[: agree + 1]


def test_tokenizer_matches_transformers(gemma: Gemma) -> None:
    """Gemma's SentencePiece vocabulary (no space prefix, runs of spaces, byte fallback, control
    and HTML tokens) encodes and decodes as transformers' tokenizer does."""
    _, tok = gemma
    data = json.loads((REF / "gemma3_270m_tokenizer.json").read_text())
    for case in data["encode"]:
        assert tok.encode(case["text"], add_bos=False) == case["ids"], case["text"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["decoded"], case["text"]
    assert (tok.bos_id, tok.eos_id) == (data["bos_token_id"], data["eos_token_id"])
    assert tok.add_bos
