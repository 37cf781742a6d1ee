"""Qwen2, Qwen3 and Gemma 3 on the same forward pass: tiny files of each family against
transformers' logits (``reference/families_reference.npz``, made by
``reference/make_family_reference.py``), and batch invariance per family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import FAMILY_SPECS, TinySpec, greedy_tokens, weights_digest, write_tiny_gguf

from zigllama_batch import LLaMAModel, load_model
from zigllama_batch.engine import SequenceStep
from zigllama_batch.engine.architecture import ARCHITECTURES, RopeLayout

REFERENCE = Path(__file__).parent / "reference" / "families_reference.npz"
FAMILIES = sorted(FAMILY_SPECS)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module", params=FAMILIES)
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, TinySpec, Path, LLaMAModel]:
    name = request.param
    spec = FAMILY_SPECS[name]
    path = write_tiny_gguf(tmp_path_factory.mktemp(name) / f"{name}.gguf", spec)
    return name, spec, path, load_model(path)[0]


def _chunked(model: LLaMAModel, ids: list[int], chunk: int) -> tuple[list[int], np.ndarray]:
    """Feed ``ids`` ``chunk`` tokens per step; the positions whose logits come back (each
    chunk's last), and those logits."""
    cache = model.new_cache(1, 128)
    ends, rows = [], []
    for pos in range(0, len(ids), chunk):
        piece = ids[pos : pos + chunk]
        rows.append(model.step([SequenceStep(0, piece, pos)], cache)[0])
        ends.append(pos + len(piece) - 1)
    return ends, np.stack(rows)


def test_the_fixture_file_is_the_one_transformers_read(
    family: tuple[str, TinySpec, Path, LLaMAModel], reference: dict[str, np.ndarray]
) -> None:
    """The tiny file the tests write holds the weights the reference was made from."""
    name, _, path, _ = family
    assert weights_digest(path) == str(reference[f"{name}_digest"])


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_logits_match_transformers_at_every_position(
    family: tuple[str, TinySpec, Path, LLaMAModel], reference: dict[str, np.ndarray], chunk: int
) -> None:
    """Logits are within 1e-4 of transformers' float32 forward pass: at every position fed token
    by token, and at the end of every chunk fed 7 at a time or as one prompt (40 tokens: past
    the sliding window of Gemma 3's local layers)."""
    name, _, _, model = family
    ids = [int(t) for t in reference[f"{name}_ids"]]
    positions, got = _chunked(model, ids, chunk)
    want = reference[f"{name}_logits"][positions]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers(
    family: tuple[str, TinySpec, Path, LLaMAModel], reference: dict[str, np.ndarray]
) -> None:
    """Greedy decoding through the KV cache gives transformers' tokens exactly."""
    name, _, _, model = family
    prompt = [int(t) for t in reference[f"{name}_prompt"]]
    want = [int(t) for t in reference[f"{name}_greedy"]]
    assert greedy_tokens(model, prompt, len(want), 128) == want


def test_logits_do_not_depend_on_batch_companions(
    family: tuple[str, TinySpec, Path, LLaMAModel],
) -> None:
    """A sequence's logits alone equal its logits in a step with other prompts and with decode
    items in scattered slots, within 1e-4."""
    _, _, _, model = family
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(0, model.vocab_size, n))) for n in (1, 6, 19, 45)]
    alone = [model.step([SequenceStep(0, p, 0)], model.new_cache(1, 128))[0] for p in prompts]
    histories = {9: [3] * 30, 14: [5, 6, 7], 2: list(range(4, 24))}
    cache = model.new_cache(16, 128)
    model.step([SequenceStep(s, h[:-1], 0) for s, h in histories.items()], cache)
    items = [SequenceStep(slot, p, 0) for slot, p in zip((0, 5, 6, 11), prompts, strict=True)]
    items += [SequenceStep(s, h[-1:], len(h) - 1) for s, h in histories.items()]
    together = model.step(items[::-1], cache)[::-1]
    for i, want in enumerate(alone):
        np.testing.assert_allclose(together[i], want, atol=1e-4, rtol=0)
    for i, history in enumerate(histories.values()):
        solo = model.step([SequenceStep(0, history, 0)], model.new_cache(1, 128))[0]
        np.testing.assert_allclose(together[len(prompts) + i], solo, atol=1e-4, rtol=0)


def test_the_table_states_each_familys_facts() -> None:
    """Llama pairs adjacent dimensions and the others pair halves; Gemma 3 alternates five
    windowed layers with one global layer."""
    assert ARCHITECTURES["llama"].rope_layout is RopeLayout.ADJACENT
    for name in ("qwen2", "qwen3", "gemma3"):
        assert ARCHITECTURES[name].rope_layout is RopeLayout.HALVES
    gemma = ARCHITECTURES["gemma3"]
    assert [gemma.is_global(i) for i in range(12)] == ([False] * 5 + [True]) * 2
    assert ARCHITECTURES["qwen2"].qkv_bias
    assert not ARCHITECTURES["qwen3"].qkv_bias


def test_gemma3_config_reads_its_window_and_head_width(
    family: tuple[str, TinySpec, Path, LLaMAModel],
) -> None:
    """Head width comes from attention.key_length, and only Gemma 3 has a window."""
    name, spec, _, model = family
    c = model.config
    assert c.head_dim == spec.hd
    if name == "gemma3":
        assert [c.window(i) for i in range(6)] == [8] * 5 + [None]
    else:
        assert c.sliding_window is None
