"""The real default model against an independent implementation (transformers on torch).

The fixtures in ``reference/`` were computed once by ``reference/make_reference.py`` (see its
docstring for the environment). Logits are compared at every position under teacher forcing, on
1,024 fixed vocabulary columns plus the reference's top 32 at each position.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zigllama_batch import GenerationConfig, LLaMAModel, TextGenerator, Tokenizer
from zigllama_batch.engine import SequenceStep

pytestmark = pytest.mark.real_model

REF = Path(__file__).parent / "reference"
Real = tuple[LLaMAModel, Tokenizer]


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REF / "smollm2_reference.npz") as data:
        return dict(data)


@pytest.mark.parametrize("prompt", range(4))
def test_teacher_forced_logits_match_transformers(
    real: Real, ref: dict[str, np.ndarray], prompt: int
) -> None:
    """Max |logit difference| < 1e-3 at every position, fed as one prefill then token by token."""
    model, _ = real
    seq = [int(t) for t in ref[f"seq{prompt}_ids"]]
    n_prompt = len(ref[f"prompt{prompt}_ids"])
    cols = ref["cols"]
    cache = model.new_cache(1, 512)
    # Prefill gives the last prompt position; single-token decode steps give the rest.
    logits = {n_prompt - 1: model.step([SequenceStep(0, seq[:n_prompt], 0)], cache)[0]}
    for pos in range(n_prompt, len(seq)):
        logits[pos] = model.step([SequenceStep(0, [seq[pos]], pos)], cache)[0]
    # And every prompt position by teacher forcing in a second slot, one token at a time.
    cache2 = model.new_cache(1, 512)
    for pos in range(n_prompt - 1):
        logits[pos] = model.step([SequenceStep(0, [seq[pos]], pos)], cache2)[0]
    worst = 0.0
    for pos, row in logits.items():
        worst = max(
            worst,
            float(np.abs(row[cols] - ref[f"sub{prompt}_logits"][pos]).max()),
            float(
                np.abs(row[ref[f"top{prompt}_ids"][pos]] - ref[f"top{prompt}_logits"][pos]).max()
            ),
        )
    assert len(logits) == len(seq)
    assert worst < 1e-3


@pytest.mark.parametrize("prompt", range(4))
def test_greedy_tokens_match_until_a_near_tie(
    real: Real, ref: dict[str, np.ndarray], prompt: int
) -> None:
    """Greedy generation equals the reference's up to its first step with a top-2 gap < 0.01."""
    model, tok = real
    want = ref[f"greedy{prompt}_ids"].tolist()
    gaps = ref[f"greedy{prompt}_top2_gap"]
    agree = int(np.argmax(gaps < 0.01)) if (gaps < 0.01).any() else len(want)
    gen = TextGenerator(model, tok)
    prompt_text = tok.decode(ref[f"prompt{prompt}_ids"].tolist(), skip_special_tokens=False)
    assert tok.encode(prompt_text) == ref[f"prompt{prompt}_ids"].tolist()
    got = gen.generate(prompt_text, GenerationConfig.greedy(max_tokens=24, ignore_eos=True))
    assert list(got.token_ids[: agree + 1]) == want[: agree + 1]


def test_tokenizer_matches_transformers(real: Real) -> None:
    """Encoding, decoding, special tokens and the chat template agree with transformers."""
    _, tok = real
    data = json.loads((REF / "smollm2_tokenizer.json").read_text())
    for case in data["encode"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"], skip_special_tokens=False) == case["text"]
    for chat in data["chat"]:
        assert tok.apply_chat_template(chat["messages"]) == chat["add_generation_prompt_true"]
        assert (
            tok.apply_chat_template(chat["messages"], add_generation_prompt=False)
            == chat["add_generation_prompt_false"]
        )
    special = data["special"]
    assert (tok.bos_id, tok.eos_id) == (special["bos_token_id"], special["eos_token_id"])
    assert not tok.add_bos


def test_chat_answer_is_sensible(real: Real) -> None:
    """A chat question gets an on-topic greedy answer that ends with the end-of-turn token."""
    model, tok = real
    result = TextGenerator(model, tok).generate(
        [{"role": "user", "content": "What is the capital of France?"}],
        GenerationConfig.greedy(max_tokens=40),
    )
    assert "Paris" in result.text
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] == tok.eos_id
