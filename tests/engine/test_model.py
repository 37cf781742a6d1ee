"""LLaMAModel.step on tiny GGUF models: correctness against an independent forward pass, batch
invariance (alone vs. batched, whole vs. chunked prompts) and input validation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tiny_gguf import TinySpec, reference_logits, write_tiny_gguf

from zigllama_batch import LLaMAModel, Tokenizer, load_model
from zigllama_batch.engine import SequenceStep

QUANT_MIXES = {
    "f32": {},
    "f16": {"weight": Q.F16},
    "q8_0": {"weight": Q.Q8_0},
    "q4_0+q4_1+q5_0": {
        "attn_q.weight": Q.Q4_0,
        "attn_k.weight": Q.Q4_1,
        "ffn_up.weight": Q.Q5_0,
        "token_embd.weight": Q.Q8_0,
    },
    "bf16+q5_1": {"ffn_gate.weight": Q.BF16, "attn_output.weight": Q.Q5_1},
}


def logits_token_by_token(model: LLaMAModel, ids: list[int], slot: int = 0) -> np.ndarray:
    cache = model.new_cache(slot + 1, 128)
    return np.stack([model.step([SequenceStep(slot, [t], p)], cache)[0] for p, t in enumerate(ids)])


@pytest.mark.parametrize("mix", sorted(QUANT_MIXES))
def test_step_matches_independent_forward_pass(tmp_path: Path, mix: str) -> None:
    """Logits at every position equal a float64 Hugging Face-style forward pass of the same file."""
    spec = TinySpec(qtypes=QUANT_MIXES[mix], tied=mix != "f16", seed=3)
    path = write_tiny_gguf(tmp_path / "m.gguf", spec)
    model, _ = load_model(path)
    ids = list(np.random.default_rng(1).integers(0, model.vocab_size, 40))
    want = reference_logits(path, spec, ids)
    got = logits_token_by_token(model, ids)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    # The prefill path (whole prompt in one step) gives the last position's logits too.
    cache = model.new_cache(1, 128)
    last = model.step([SequenceStep(0, ids, 0)], cache)[0]
    np.testing.assert_allclose(last, want[-1], atol=2e-4, rtol=0)


def test_grouped_query_attention_and_untied_head(tmp_path: Path) -> None:
    """A model with 8 query heads sharing 2 KV heads and a separate output head is exact too."""
    spec = TinySpec(n_heads=8, n_kv_heads=2, dim=128, tied=False, n_layers=3, seed=5)
    path = write_tiny_gguf(tmp_path / "m.gguf", spec)
    model, _ = load_model(path)
    ids = list(range(5, 45))
    np.testing.assert_allclose(
        logits_token_by_token(model, ids), reference_logits(path, spec, ids), atol=2e-4, rtol=0
    )


def test_llama3_rope_frequency_factors_are_applied(tmp_path: Path) -> None:
    """A Llama 3.1-style file with ``rope_freqs.weight`` loads and divides each pair's RoPE
    frequency by its factor, as an independent forward pass does."""
    spec = TinySpec(rope_freqs=True, seed=9, rope_base=500000.0)
    path = write_tiny_gguf(tmp_path / "m.gguf", spec)
    model, _ = load_model(path)
    assert model.weights.rope_freqs is not None
    ids = list(range(7, 47))
    want = reference_logits(path, spec, ids)
    np.testing.assert_allclose(logits_token_by_token(model, ids), want, atol=2e-4, rtol=0)
    without = write_tiny_gguf(tmp_path / "plain.gguf", TinySpec(seed=9, rope_base=500000.0))
    assert not np.allclose(logits_token_by_token(load_model(without)[0], ids), want, atol=1e-2)


def _prompts(model: LLaMAModel) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [list(map(int, rng.integers(0, model.vocab_size, n))) for n in (1, 5, 17, 33, 64)]


def test_logits_do_not_depend_on_batch_companions(tiny: tuple[LLaMAModel, Tokenizer]) -> None:
    """A sequence's logits are the same alone or in a step with other prefills and decodes."""
    model, _ = tiny
    prompts = _prompts(model)
    alone = []
    for p in prompts:
        cache = model.new_cache(1, 128)
        alone.append(model.step([SequenceStep(0, p, 0)], cache)[0])
    cache = model.new_cache(8, 128)
    # Warm two other slots so the mixed step also carries decode items at other positions.
    model.step([SequenceStep(6, [3, 4, 5], 0), SequenceStep(7, [9] * 20, 0)], cache)
    items = [SequenceStep(i, p, 0) for i, p in enumerate(prompts)]
    items += [SequenceStep(6, [8], 3), SequenceStep(7, [2], 20)]
    together = model.step(items[::-1], cache)[::-1]
    for i in range(len(prompts)):
        np.testing.assert_allclose(together[i], alone[i], atol=1e-4, rtol=0)
    for row, history in ((5, [3, 4, 5, 8]), (6, [9] * 20 + [2])):
        solo = model.step([SequenceStep(0, history, 0)], model.new_cache(1, 128))[0]
        np.testing.assert_allclose(together[row], solo, atol=1e-4, rtol=0)


def test_prompt_fed_whole_in_chunks_or_token_by_token_agree(
    tiny: tuple[LLaMAModel, Tokenizer],
) -> None:
    """Whole prompt, chunks of 7, and single tokens give the same logits for what follows."""
    model, _ = tiny
    prompt = _prompts(model)[-1]
    nxt = [11, 12, 13]
    results = []
    for chunk in (len(prompt), 7, 1):
        cache = model.new_cache(1, 128)
        for pos in range(0, len(prompt), chunk):
            out = model.step([SequenceStep(0, prompt[pos : pos + chunk], pos)], cache)[0]
        trail = [out]
        for i, t in enumerate(nxt):
            trail.append(model.step([SequenceStep(0, [t], len(prompt) + i)], cache)[0])
        results.append(np.stack(trail))
    np.testing.assert_allclose(results[1], results[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(results[2], results[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "slots",
    [
        [5, 1, 3, 0, 2, 4],  # one dense run, items out of slot order
        [0, 2, 4, 6, 8, 10],  # one run with unused slots between the items
        [0, 1, 7, 8, 14, 15],  # three dense runs
        [0, 4, 8, 12, 16, 20],  # too scattered for runs: gathered
    ],
)
def test_decode_batch_over_scattered_slots_matches_neighbouring_slots(
    tiny: tuple[LLaMAModel, Tokenizer], slots: list[int]
) -> None:
    """Decode items give the same logits whichever cache slots they sit in (runs of slots
    are read through views, scattered ones gathered), with unused slots in between holding
    other data."""
    model, _ = tiny
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(0, model.vocab_size, n))) for n in (3, 9, 1, 30, 12, 5)]
    outs = []
    for layout in (list(range(6)), slots):
        cache = model.new_cache(24, 128)
        for k, v in zip(cache.k, cache.v, strict=True):  # garbage everywhere, unused slots too
            k[:] = 7.0
            v[:] = -3.0
        model.step([SequenceStep(s, p, 0) for s, p in zip(layout, prompts, strict=True)], cache)
        outs.append(
            model.step(
                [SequenceStep(s, [21], len(p)) for s, p in zip(layout, prompts, strict=True)], cache
            )
        )
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-4, rtol=0)


def test_step_writes_only_its_own_slots(tiny: tuple[LLaMAModel, Tokenizer]) -> None:
    """A step never touches the cache of slots it was not given."""
    model, _ = tiny
    cache = model.new_cache(3, 64)
    model.step([SequenceStep(1, [1, 2, 3], 0)], cache)
    snapshot = [k[[0, 2]].copy() for k in cache.k]
    model.step([SequenceStep(1, [4], 3)], cache)
    for layer, k in enumerate(cache.k):
        assert np.array_equal(k[[0, 2]], snapshot[layer])


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ([SequenceStep(2, [1], 0)], "slot 2 outside"),
        ([SequenceStep(0, [1], 0), SequenceStep(0, [2], 1)], "appears twice"),
        ([SequenceStep(0, [], 0)], "no new tokens"),
        ([SequenceStep(0, [1, 2], 63)], "do not fit"),
        ([SequenceStep(0, [1], -1)], "do not fit"),
        ([SequenceStep(0, [10_000], 0)], "token ids must be"),
    ],
)
def test_step_rejects_bad_items(
    tiny: tuple[LLaMAModel, Tokenizer], items: list[SequenceStep], match: str
) -> None:
    """Malformed step items raise ValueError saying what is wrong."""
    model, _ = tiny
    with pytest.raises(ValueError, match=match):
        model.step(items, model.new_cache(2, 64))


def test_empty_step_returns_no_logits(tiny: tuple[LLaMAModel, Tokenizer]) -> None:
    """A step with no items is a no-op with a (0, vocab) result."""
    model, _ = tiny
    assert model.step([], model.new_cache(1, 8)).shape == (0, model.vocab_size)


def test_kv_cache_refuses_more_context_than_the_model_has(
    write_gguf: Callable[..., Path],
) -> None:
    """A cache longer than the model's context is refused, naming max_context."""
    model, _ = load_model(write_gguf())
    with pytest.raises(ValueError, match="max_context"):
        model.new_cache(1, 10_000)


def test_rope_tables_grow_to_positions_past_their_first_length(
    write_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step at positions past the RoPE tables' first length gives the logits of a model whose
    tables covered them from the start."""
    from zigllama_batch.engine import model as model_module

    path = write_gguf(context_length=8192)
    monkeypatch.setattr(model_module, "_ROPE_POSITIONS", 64)
    grown, _ = load_model(path)
    monkeypatch.setattr(model_module, "_ROPE_POSITIONS", 8192)
    whole, _ = load_model(path)
    outs = []
    for m in (grown, whole):
        cache = m.new_cache(1, 8192)
        m.step([SequenceStep(0, [5, 6, 7], 0)], cache)
        outs.append(m.step([SequenceStep(0, [9, 10], 5000)], cache))
    np.testing.assert_array_equal(outs[0], outs[1])
