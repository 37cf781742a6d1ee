"""The compiled parts of a block besides its products: prompt-chunk attention, RMSNorm and the
gated activation equal their numpy definitions (in float64), and the float32 ``exp`` they use
stays within 3 ulp over its whole range; RoPE with the cache writes
equals numpy's complex product."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from zigllama_batch.engine.kernels import (
    attend_prefill,
    gated_activation,
    rms_norm,
    rotate_and_store,
)
from zigllama_batch.engine.kernels.elementwise import exp


def reference_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, window: int | None
) -> np.ndarray:
    """Causal attention in float64: q (T, H, hd) at positions start.., over keys and values
    (KVH, positions, hd) of one slot."""
    t, n_heads, _ = q.shape
    group = n_heads // keys.shape[0]
    out = np.zeros(q.shape)
    for i in range(t):
        pos = start + i
        lo = 0 if window is None else max(0, pos - window + 1)
        for h in range(n_heads):
            k, v = keys[h // group, lo : pos + 1], values[h // group, lo : pos + 1]
            scores = k.astype(np.float64) @ q[i, h]
            weights = np.exp(scores - scores.max())
            out[i, h] = weights @ v / weights.sum()
    return out


@pytest.mark.parametrize(
    ("t", "start", "window"),
    [(1, 0, None), (17, 0, None), (130, 0, None), (64, 200, None), (100, 30, 40), (70, 0, 8)],
)
def test_prompt_chunk_attention_equals_the_causal_definition(
    t: int, start: int, window: int | None
) -> None:
    """Each query of a chunk attends to exactly the positions up to its own (the last
    ``window`` of them), whatever the chunk's length, offset in the slot and block split."""
    rng = np.random.default_rng(t + start)
    n_slots, n_kv, hd, n_heads = 3, 2, 16, 6
    k_cache = rng.standard_normal((n_slots, n_kv, 512, hd)).astype(np.float32)
    v_cache = rng.standard_normal((n_slots, n_kv, 512, hd)).astype(np.float32)
    q = (rng.standard_normal((t, n_heads, hd)) * 0.5).astype(np.float32)
    got = attend_prefill(q, k_cache, v_cache, 1, start, window)
    want = reference_attention(q, k_cache[1], v_cache[1], start, window)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_rms_norm_equals_its_definition(rows: int) -> None:
    """x / sqrt(mean(x^2) + eps) * weight, row by row, for one row or many (threads)."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 96)).astype(np.float32) * 3
    weight = rng.standard_normal(96).astype(np.float32)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-6) * weight
    np.testing.assert_allclose(rms_norm(x, weight, 1e-6), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 20])
def test_gated_activation_equals_its_definition(gelu: bool, rows: int) -> None:
    """act(gate) * up with gate the first half of each row, including gates far out in both
    tails (where e^x saturates)."""
    rng = np.random.default_rng(rows)
    gate_up = (rng.standard_normal((rows, 64)) * 4).astype(np.float32)
    gate_up[0, :4] = [-120.0, -30.0, 30.0, 120.0]
    g, up = gate_up[:, :32].astype(np.float64), gate_up[:, 32:].astype(np.float64)
    if gelu:
        act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    else:
        act = g / (1 + np.exp(-g))
    np.testing.assert_allclose(gated_activation(gate_up, gelu), act * up, rtol=2e-6, atol=1e-6)


@njit(fastmath=True)
def _exp_all(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(x.shape[0]):
        out[i] = exp(x[i])


def test_exp_is_within_3_ulp_over_float32s_range() -> None:
    """The kernels' e^x, over every input from float32's smallest normal result to its
    largest, and its clamped ends."""
    x = np.linspace(-87.3, 88.3, 1_000_001).astype(np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(out - want) / want).max() < 3 * 2.0**-23
    ends = np.array([-np.inf, -1000.0, 1000.0], np.float32)
    _exp_all(ends, out[:3])
    assert 0 < out[0] == out[1] < 1.001 * np.finfo(np.float32).tiny
    assert np.isfinite(out[2])


@pytest.mark.parametrize("n", [1, 3, 20])
def test_rope_store_rotates_scales_and_writes_the_cache_as_numpy_does(n: int) -> None:
    """Queries come back rotated then scaled, keys (rotated) and values land at their slots'
    positions, as numpy's complex64 product (up to its rounding: numpy may fuse a multiply
    and an add); nothing else in the cache changes."""
    rng = np.random.default_rng(n)
    n_heads, n_kv, hd = 6, 2, 8
    qk = rng.standard_normal((n, n_heads + n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((n, n_kv, hd)).astype(np.float32)
    angles = rng.uniform(0, 6.3, (n, 1, hd // 2))
    rotation = np.exp(1j * angles).astype(np.complex64)
    k_cache = np.zeros((4, n_kv, 32, hd), np.float32)
    v_cache = np.zeros_like(k_cache)
    slots = rng.integers(0, 4, n).astype(np.int64)
    positions = rng.permutation(32)[:n].astype(np.int64)
    q = rotate_and_store(qk, v, rotation, 0.125, k_cache, v_cache, slots, positions)
    rotated = (qk.view(np.complex64) * rotation).view(np.float32)
    want_q = rotated[:, :n_heads] * np.float32(0.125)
    np.testing.assert_allclose(q, want_q, rtol=1e-6, atol=1e-7)
    want_k, want_v = np.zeros_like(k_cache), np.zeros_like(v_cache)
    want_k[slots, :, positions] = rotated[:, n_heads:]
    want_v[slots, :, positions] = v
    np.testing.assert_allclose(k_cache, want_k, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(v_cache, want_v)
