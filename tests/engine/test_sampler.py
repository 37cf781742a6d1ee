"""Batched sampling: each filter does what it says, seeds are per request whatever the batch,
and sampling frequencies follow the filtered distribution."""

from __future__ import annotations

import numpy as np
import pytest

from zigllama_batch import GenerationConfig
from zigllama_batch.engine import SamplingState
from zigllama_batch.engine.sampler import sample

V = 3000


def _logits(rows: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, V)) * scale).astype(np.float32)


def _state(**cfg: object) -> SamplingState:
    return SamplingState(GenerationConfig(**cfg), [1, 2, 3], V)  # type: ignore[arg-type]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_picks_argmax_and_reports_logprob() -> None:
    """Temperature 0 returns the argmax and its log-softmax."""
    logits = _logits(4)
    tokens, logprobs = sample(logits, [_state(temperature=0.0, logprobs=True) for _ in range(4)])
    assert tokens.tolist() == logits.argmax(axis=1).tolist()
    want = [
        np.log(_softmax(row.astype(np.float64))[t]) for row, t in zip(logits, tokens, strict=True)
    ]
    np.testing.assert_allclose(logprobs, want, atol=1e-5)


def test_logprobs_are_nan_unless_asked() -> None:
    """Rows that did not ask for logprobs get NaN."""
    _, logprobs = sample(
        _logits(2), [_state(temperature=0.0), _state(temperature=0.0, logprobs=True)]
    )
    assert np.isnan(logprobs[0])
    assert np.isfinite(logprobs[1])


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    """A seeded row draws the same tokens alone or among other rows, in any position."""
    logits = _logits(6, seed=1, scale=1.0)
    cfg = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234}
    alone = sample(logits[2:3], [_state(**cfg)])[0][0]
    seq_alone, seq_batched = [], []
    s_alone, s_batch = _state(**cfg), _state(**cfg)
    others = [_state(temperature=1.0, top_k=0, top_p=1.0, seed=i) for i in range(5)]
    for step in range(20):
        row = _logits(1, seed=100 + step, scale=1.0)
        seq_alone.append(int(sample(row, [s_alone])[0][0]))
        batch = np.concatenate([_logits(3, seed=step), row, _logits(2, seed=50 + step)])
        states = [*others[:3], s_batch, *others[3:]]
        seq_batched.append(int(sample(batch, states)[0][3]))
    assert seq_alone == seq_batched
    assert alone == sample(logits[2:3], [_state(**cfg)])[0][0]


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    """top_k=1, or a top_p below the best token's probability (0 included, as OpenAI allows),
    always yields the argmax."""
    logits = _logits(8, seed=2)
    for cfg in (
        {"top_k": 1, "temperature": 1.5},
        {"top_p": 1e-6, "temperature": 1.5, "top_k": 0},
        {"top_p": 0.0, "temperature": 1.5, "top_k": 0},
    ):
        tokens, _ = sample(logits, [_state(seed=i, **cfg) for i in range(8)])
        assert tokens.tolist() == logits.argmax(axis=1).tolist()


def _frequencies(logits: np.ndarray, n: int, **cfg: object) -> np.ndarray:
    state = _state(seed=7, **cfg)
    counts = np.zeros(V)
    rows = np.repeat(logits[None], 250, axis=0)
    for _ in range(n // 250):
        tokens, _ = sample(rows, [state] * 250)
        np.add.at(counts, tokens, 1)
    return counts / counts.sum()


def test_temperature_sampling_follows_the_softmax() -> None:
    """Pure temperature sampling over the whole vocabulary matches softmax(logits / T)."""
    logits = np.full(V, -10.0, np.float32)
    logits[:5] = [2.0, 1.5, 1.0, 0.5, 0.0]
    freq = _frequencies(logits, 20_000, temperature=0.8, top_k=0, top_p=1.0)
    want = _softmax(logits.astype(np.float64) / 0.8)
    np.testing.assert_allclose(freq[:5], want[:5], atol=0.015)


def test_top_k_top_p_min_p_keep_exactly_their_sets() -> None:
    """Each filter samples only from the tokens it keeps, in proportion to their mass."""
    logits = np.full(V, -20.0, np.float32)
    logits[:6] = np.log([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    freq = _frequencies(logits, 10_000, temperature=1.0, top_k=3, top_p=1.0)
    assert set(np.flatnonzero(freq)) == {0, 1, 2}
    np.testing.assert_allclose(freq[:3], np.array([0.4, 0.25, 0.15]) / 0.8, atol=0.02)
    freq = _frequencies(logits, 10_000, temperature=1.0, top_k=0, top_p=0.7)
    assert set(np.flatnonzero(freq)) == {0, 1, 2}  # 0.4 + 0.25 < 0.7 needs the third
    freq = _frequencies(logits, 10_000, temperature=1.0, top_k=0, top_p=1.0, min_p=0.3)
    assert set(np.flatnonzero(freq)) == {0, 1, 2}  # 0.15 >= 0.3 * 0.4 > 0.1


def test_wide_nucleus_beyond_the_candidate_window_is_exact() -> None:
    """A flat distribution whose nucleus exceeds the fast path's window is still sampled right."""
    logits = np.zeros(V, np.float32)  # uniform: top_p 0.899 keeps 2697 or 2698 tokens
    freq = _frequencies(logits, 40_000, temperature=1.0, top_k=0, top_p=0.899)
    kept = np.flatnonzero(freq)
    assert kept.max() < 2700  # ties are ordered by token id
    assert len(kept) > 2500


def test_repetition_penalty_discourages_seen_tokens() -> None:
    """Seen tokens' positive logits are divided and negative ones multiplied by the penalty."""
    logits = np.zeros((1, V), np.float32)
    logits[0, [1, 2, 3, 4]] = [4.0, -1.0, 3.9, 3.0]
    state = _state(temperature=0.0, repetition_penalty=2.0)  # prompt [1, 2, 3] is seen
    tokens, _ = sample(logits, [state])
    assert tokens[0] == 4  # 4.0 -> 2.0 and 3.9 -> 1.95 fall below 3.0
    work = logits[0].copy()
    state.apply_penalties(work)
    assert work[1] == 2.0
    assert work[2] == -2.0
    assert work[4] == 1.5


def test_presence_and_frequency_penalties_count_generated_tokens() -> None:
    """OpenAI semantics: logit -= presence * [count > 0] + frequency * count, outputs only."""
    state = _state(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    for t in (7, 7, 9):
        state.record(t)
    work = np.zeros(V, np.float32)
    state.apply_penalties(work)
    assert work[7] == pytest.approx(-1.0)
    assert work[9] == pytest.approx(-0.75)
    assert work[1] == 0.0  # prompt tokens are not penalised


def test_sample_checks_row_count() -> None:
    """Mismatched logits rows and states raise ValueError."""
    with pytest.raises(ValueError, match="sampling states"):
        sample(_logits(2), [_state()])


class OnlyAllowed:
    """A LogitsHook standing for a grammar's mask: every token but ``allowed`` is banned."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed
        self.accepted: list[int] = []

    def adjust(self, logits: np.ndarray) -> None:
        keep = logits[self.allowed].copy()
        logits[:] = -np.inf
        logits[self.allowed] = keep

    def accept(self, token_id: int) -> tuple[int, ...]:
        self.accepted.append(token_id)
        return ()

    finished = False
    error = None


@pytest.mark.parametrize(
    "cfg",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 1},
        {"temperature": 1.0, "top_k": 40, "top_p": 0.9, "seed": 2},
        {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "min_p": 0.05, "seed": 3},
        {"temperature": 0.0, "repetition_penalty": 1.3},
    ],
)
def test_a_logits_hook_restricts_its_row_before_the_choice(cfg: dict[str, object]) -> None:
    """A row's hook decides among the tokens it allows (greedy or drawn, after penalties), sees
    every chosen token, and leaves the other rows of the batch exactly as they were; logprobs
    stay those of the raw distribution."""
    logits = _logits(3, seed=7)
    allowed = [5, 17, 2999]
    hook = OnlyAllowed(allowed)
    plain = [_state(**cfg), _state(**cfg)]
    hooked = SamplingState(
        GenerationConfig(logprobs=True, **cfg),  # type: ignore[arg-type]
        [1, 2, 3],
        V,
        hook=hook,
    )
    twins = [_state(**cfg), _state(**cfg)]  # the plain rows, sampled without the hooked one
    chosen = []
    for _ in range(20):
        tokens, logprobs = sample(logits, [plain[0], hooked, plain[1]])
        chosen.append(int(tokens[1]))
        alone = sample(logits[[0, 2]], twins)[0]
        assert [int(tokens[0]), int(tokens[2])] == alone.tolist()
        want = np.log(_softmax(logits[1].astype(np.float64))[tokens[1]])
        np.testing.assert_allclose(logprobs[1], want, atol=1e-5)
    assert set(chosen) <= set(allowed)
    assert hook.accepted == chosen
    if cfg["temperature"] == 0.0 and "repetition_penalty" not in cfg:
        assert chosen == [allowed[int(np.argmax(logits[1, allowed]))]] * 20


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 5e-324, 1e-6])
def test_vanishing_temperature_is_greedy_not_nan(temperature: float) -> None:
    """A temperature too small for float32 division decodes greedily instead of dividing by
    zero (which made every logit NaN and picked token 0)."""
    logits = _logits(4, seed=3)
    states = [_state(temperature=temperature, top_k=0, top_p=1.0, seed=i) for i in range(4)]
    tokens, _ = sample(logits, states)
    assert tokens.tolist() == logits.argmax(axis=1).tolist()


def test_smallest_repetition_penalty_keeps_logits_finite() -> None:
    """At the smallest accepted repetition penalty the penalised logits stay finite and the
    draw still lands on a real token, not on NaN's token 0."""
    logits = np.full((1, V), -30.0, np.float32)
    logits[0, 1:4] = 30.0  # the prompt's tokens [1, 2, 3], strongly preferred
    state = _state(temperature=1.0, top_k=0, top_p=1.0, seed=5, repetition_penalty=0.01)
    adjusted = logits[0].copy()
    state.adjust(adjusted)
    assert np.isfinite(adjusted).all()
    assert sample(logits, [state])[0][0] in (1, 2, 3)


def test_negative_seed_is_a_reproducible_stream() -> None:
    """A negative seed (valid in OpenAI's API) seeds a stream like any other: same seed, same
    tokens; another seed, other tokens."""
    logits = _logits(1, seed=4, scale=0.5)
    cfg = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}

    def run(seed: int) -> list[int]:
        state = _state(seed=seed, **cfg)
        return [int(sample(logits, [state])[0][0]) for _ in range(20)]

    assert run(-7) == run(-7)
    assert run(-7) != run(7)
