"""Quantized kernels: every block type decodes to exactly the gguf package's values, products
equal dequantize-then-float32 for every row count, and a whole model of each type decodes the
same greedy tokens as its float32 twin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tiny_gguf import greedy_tokens

from zigllama_batch import LLaMAModel, load_model
from zigllama_batch.engine import SequenceStep
from zigllama_batch.engine.gguf_loader import LayerWeights, LlamaWeights
from zigllama_batch.engine.kernels import (
    GEMV_MAX_ROWS,
    Linear,
    Weight,
    dequantize,
    embedding_rows,
    linear,
    set_threads,
)

LEGACY = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16]
K_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
ALL_TYPES = [*LEGACY, *K_TYPES, Q.F32]


def quantized(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF data of a rows x cols tensor: quantized from normal values where gguf can
    quantize the type, else random blocks with small finite float16 scales."""
    rng = np.random.default_rng(seed)
    if qtype not in K_TYPES:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        return values if qtype == Q.F32 else gguf.quants.quantize(values, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale_at = [208] if qtype == Q.Q6_K else [0, 2]  # d (and dmin): keep them finite
    for at, value in zip(scale_at, (0.01, 0.003), strict=False):
        raw[..., at : at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_decoded_values_are_exactly_the_gguf_packages(qtype: Q) -> None:
    """Every value a weight decodes to is bit for bit gguf's dequantization of its blocks."""
    raw = quantized(qtype, 24, 512)
    want = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(24, 512)
    weight = Weight.from_gguf(raw, qtype, 24, 512)
    np.testing.assert_array_equal(dequantize(weight), want)
    ids = np.array([5, 0, 23, 5], dtype=np.int64)
    np.testing.assert_array_equal(embedding_rows(weight, ids), want[ids])
    tiled = Linear.of(weight).parts[0]  # a tied embedding: looked up from the head's tiles
    np.testing.assert_array_equal(dequantize(tiled), want)
    np.testing.assert_array_equal(embedding_rows(tiled, ids), want[ids])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_products_equal_dequantize_then_float32_for_every_row_count(qtype: Q) -> None:
    """linear(x, W) equals x @ dequantize(W).T within 1e-4 relative, on both sides of the
    switch between the few-row and the many-row kernels."""
    raw = quantized(qtype, 72, 512, seed=1)
    weight = Weight.from_gguf(raw, qtype, 72, 512)
    dense = dequantize(weight).astype(np.float64)
    rng = np.random.default_rng(2)
    limit = GEMV_MAX_ROWS.get(qtype, 0)
    for n in sorted({1, 2, 3, 4, 7, limit, limit + 1, 17, 40} - {0}):
        x = rng.standard_normal((n, 512)).astype(np.float32)
        want = x @ dense.T
        got = linear(x, Linear.of(weight))
        assert got.shape == (n, 72)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_layer_of_parts_of_different_types_is_one_product() -> None:
    """Weights of different types concatenated by rows multiply as the stacked matrix, and
    parts of one type merge into one."""
    a = Weight.from_gguf(quantized(Q.Q4_K, 16, 256), Q.Q4_K, 16, 256)
    b = Weight.from_gguf(quantized(Q.Q4_K, 8, 256, seed=3), Q.Q4_K, 8, 256)
    c = Weight.from_gguf(quantized(Q.Q6_K, 8, 256, seed=4), Q.Q6_K, 8, 256)
    layer = Weight.concat([a, b, c])
    assert [p.qtype for p in layer.parts] == [Q.Q4_K, Q.Q6_K]
    assert layer.rows == 32
    dense = np.concatenate([dequantize(a), dequantize(b), dequantize(c)])
    np.testing.assert_array_equal(dequantize(layer), dense)
    x = np.random.default_rng(5).standard_normal((7, 256)).astype(np.float32)
    for rows in (x[:1], x):
        np.testing.assert_allclose(linear(rows, layer), rows @ dense.T, rtol=1e-4, atol=1e-4)


def test_blocks_that_do_not_fill_the_shape_are_refused() -> None:
    """Data of the wrong size for its shape raises ValueError naming the type."""
    raw = quantized(Q.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="Q8_0"):
        Weight.from_gguf(raw[:, :-1], Q.Q8_0, 4, 64)


def float32_twin(model: LLaMAModel) -> LLaMAModel:
    """The same model with every weight dequantized to float32 once (the former engine)."""

    def dense(w: Linear) -> Linear:
        return Linear.of(Weight.from_float(dequantize(w)))

    w = model.weights
    embed = Weight.from_float(dequantize(w.embed))
    layers = [
        LayerWeights(
            attn_norm=layer.attn_norm,
            wqkv=dense(layer.wqkv),
            wo=dense(layer.wo),
            ffn_norm=layer.ffn_norm,
            w_gate_up=dense(layer.w_gate_up),
            w_down=dense(layer.w_down),
            bqkv=layer.bqkv,
            q_norm=layer.q_norm,
            k_norm=layer.k_norm,
            post_attn_norm=layer.post_attn_norm,
            post_ffn_norm=layer.post_ffn_norm,
        )
        for layer in w.layers
    ]
    output = Linear.of(embed) if w.output.parts == (w.embed,) else dense(w.output)
    weights = LlamaWeights(
        embed=embed,
        layers=layers,
        output_norm=w.output_norm,
        output=output,
        rope_freqs=w.rope_freqs,
    )
    return LLaMAModel(model.config, weights)


MODEL_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16, Q.Q6_K]


@pytest.mark.parametrize("qtype", MODEL_TYPES, ids=lambda t: t.name)
def test_a_quantized_model_matches_its_float32_twin(
    write_gguf: Callable[..., Path], qtype: Q
) -> None:
    """A tiny model with every matrix in one type gives the logits of the same weights in
    float32 (within 1e-4 of their scale), batched or alone, and the same greedy tokens."""
    suffixes = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"]
    suffixes += ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "token_embd.weight"]
    dim = 256 if qtype in K_TYPES else 64
    path = write_gguf(qtypes=dict.fromkeys(suffixes, qtype), dim=dim, ffn_dim=256, embed_scale=0.1)
    model, _ = load_model(path)
    assert {p.qtype for p in model.weights.layers[0].wqkv.parts} == {qtype}
    twin = float32_twin(model)
    prompt = [5, 17, 9, 30, 2, 44, 8]
    assert greedy_tokens(model, prompt, 12, 64) == greedy_tokens(twin, prompt, 12, 64)

    # A batch of 9 items (the many-row kernels) against each item alone (the few-row ones).
    items = [SequenceStep(i, [3 + i, 7, 11 + i], 0) for i in range(9)]
    together = model.step(items, model.new_cache(9, 16))
    for i, item in enumerate(items):
        alone = model.step([SequenceStep(0, item.token_ids, 0)], model.new_cache(1, 16))
        want = twin.step([SequenceStep(0, item.token_ids, 0)], twin.new_cache(1, 16))[0]
        scale = max(1.0, float(np.abs(want).max()))  # random K-quant blocks give large logits
        np.testing.assert_allclose(together[i], alone[0], atol=1e-4 * scale, rtol=0)
        np.testing.assert_allclose(alone[0], want, atol=1e-4 * scale, rtol=0)


def test_set_threads_limits_the_kernels_threads_and_refuses_zero() -> None:
    """After set_threads(1) a product runs numba on one thread in the calling thread, with the
    same result; set_threads(None) gives every core back; fewer than one thread is refused."""
    weight = Linear.of(Weight.from_gguf(quantized(Q.Q8_0, 256, 64), Q.Q8_0, 256, 64))
    x = np.random.default_rng(6).standard_normal((2, 64)).astype(np.float32)
    want = linear(x, weight)
    try:
        set_threads(1)
        np.testing.assert_array_equal(linear(x, weight), want)
        assert numba.get_num_threads() == 1
    finally:
        set_threads(None)
    linear(x, weight)
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    with pytest.raises(ValueError, match="at least 1"):
        set_threads(0)
