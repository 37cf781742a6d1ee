"""Products with int8 activations (``load_model(activations="int8")``): the weights' values
stay the file's, each block of 32 activations is rounded to int8 as llama.cpp does, and the
result is exactly what that rounding implies, whatever the batch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from test_kernels import quantized

from zigllama_batch import load_model
from zigllama_batch.engine import SequenceStep
from zigllama_batch.engine.kernels import Linear, Weight, dequantize, embedding_rows, linear
from zigllama_batch.engine.kernels.int8 import TYPES, available, quantize

pytestmark = pytest.mark.skipif(not available(), reason="needs AVX2 or AVX-512 VNNI")

INT8_TYPES = sorted(TYPES, key=lambda t: t.name)


def rounded_activations(x: np.ndarray) -> np.ndarray:
    """x with each block of 32 values rounded as ggml's Q8_0 does, in float64: d = max|x| /
    127, q = round(x / d), value q d."""
    blocks = x.astype(np.float64).reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(axis=2, keepdims=True) / 127
    q = np.rint(blocks / np.where(d > 0, d, 1))
    return (q * d).reshape(x.shape)


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_the_int8_layout_holds_exactly_the_gguf_values(qtype: Q) -> None:
    """A weight laid out for int8 products decodes (whole, or rows looked up as a tied
    embedding) to bit for bit gguf's dequantization, rows that do not fill a group included."""
    raw = quantized(qtype, 24, 512)
    want = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(24, 512)
    packed = Linear.of(Weight.from_gguf(raw, qtype, 24, 512), int8=True).parts[0]
    assert packed.packed is not None
    np.testing.assert_array_equal(dequantize(packed), want)
    ids = np.array([5, 0, 23, 16, 5], dtype=np.int64)
    np.testing.assert_array_equal(embedding_rows(packed, ids), want[ids])


def test_activations_are_rounded_as_ggml_rounds_them() -> None:
    """quantize() gives each block's scale max|x| / 127, its values round(x / d) (zero for an
    all-zero block) and their sum."""
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)
    x[1, 32:64] = 0.0
    x4, sums, scales = quantize(x)
    q = x4.view(np.int8).reshape(3, 3, 32).astype(np.int64)
    np.testing.assert_allclose(scales, np.abs(x.reshape(3, 3, 32)).max(axis=2) / 127, rtol=1e-6)
    assert np.abs(q).max() <= 127
    np.testing.assert_array_equal(q.sum(axis=2), sums)
    assert not q[1, 1].any()
    assert scales[1, 1] == 0
    np.testing.assert_allclose(
        q * scales[..., None], rounded_activations(x).reshape(3, 3, 32), atol=1e-6
    )


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_int8_products_are_the_rounded_activations_times_the_exact_weights(qtype: Q) -> None:
    """linear() in int8 mode equals (x rounded to int8 blocks) @ dequantize(W).T within float32
    rounding (1e-5 of the largest), for every row count the kernels split rows into (1, 2, 4
    and the rows of a thread's share) and for outputs that do not fill a group; and the exact
    product within 2%."""
    raw = quantized(qtype, 72, 512, seed=1)
    weight = Weight.from_gguf(raw, qtype, 72, 512)
    layer = Linear.of(weight, int8=True)
    dense = dequantize(weight).astype(np.float64)
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 4, 5, 7, 9, 64, 70):
        x = rng.standard_normal((n, 512)).astype(np.float32)
        got = linear(x, layer)
        assert got.shape == (n, 72)
        want = rounded_activations(x) @ dense.T
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), n
        exact = x @ dense.T
        assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max(), n


def test_each_rows_int8_product_is_the_same_in_any_batch() -> None:
    """A row's int8 product is bit for bit the same alone, among 3 rows, or among 70."""
    layer = Linear.of(Weight.from_gguf(quantized(Q.Q4_0, 40, 256), Q.Q4_0, 40, 256), int8=True)
    x = np.random.default_rng(3).standard_normal((70, 256)).astype(np.float32)
    together = linear(x, layer)
    for i in (0, 2, 37, 69):
        np.testing.assert_array_equal(linear(x[i : i + 1], layer)[0], together[i])
        np.testing.assert_array_equal(linear(x[i : i + 3], layer)[0], together[i])


def test_layers_of_other_types_keep_the_exact_products_in_int8_mode() -> None:
    """Only the types of TYPES are laid out for int8: a Q6_K part beside a Q8_0 one
    keeps its exact product, and the stacked layer is one product."""
    a = Weight.from_gguf(quantized(Q.Q8_0, 16, 256), Q.Q8_0, 16, 256)
    b = Weight.from_gguf(quantized(Q.Q6_K, 8, 256, seed=4), Q.Q6_K, 8, 256)
    layer = Weight.concat([a, b], int8=True)
    assert layer.parts[0].packed is not None
    assert layer.parts[1].tiles is not None
    x = np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)
    got = linear(x, layer)
    np.testing.assert_allclose(got[:, 16:], linear(x, Linear.of(b)), rtol=1e-6, atol=1e-6)
    want = rounded_activations(x) @ dequantize(a).astype(np.float64).T
    assert np.abs(got[:, :16] - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_a_model_loaded_with_int8_activations_is_close_to_exact_and_batch_invariant(
    write_gguf: Callable[..., Path], qtype: Q
) -> None:
    """A tiny model of one type loaded with int8 activations: its layers are laid out for
    int8, its logits are within 5% of the exact model's scale, and an item's logits are the
    same in a batch of 9 as alone."""
    suffixes = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"]
    suffixes += ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "token_embd.weight"]
    dim = 256 if qtype == Q.Q4_K else 64  # a K-quant block is 256 values
    path = write_gguf(qtypes=dict.fromkeys(suffixes, qtype), dim=dim, ffn_dim=256, embed_scale=0.1)
    exact, _ = load_model(path)
    model, _ = load_model(path, activations="int8")
    assert all(p.packed is not None for p in model.weights.layers[0].wqkv.parts)
    assert model.weights.output.parts[0].packed is not None
    items = [SequenceStep(i, [3 + i, 7, 11 + i], 0) for i in range(9)]
    together = model.step(items, model.new_cache(9, 16))
    for i, item in enumerate(items):
        alone = model.step([SequenceStep(0, item.token_ids, 0)], model.new_cache(1, 16))[0]
        want = exact.step([SequenceStep(0, item.token_ids, 0)], exact.new_cache(1, 16))[0]
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(together[i], alone, atol=1e-5 * scale, rtol=0)
        assert np.abs(alone - want).max() <= 0.05 * scale


def test_load_model_refuses_unknown_activations(write_gguf: Callable[..., Path]) -> None:
    """activations other than "float32" and "int8" is a ValueError naming both."""
    with pytest.raises(ValueError, match="'float32' or 'int8'"):
        load_model(write_gguf(), activations="int4")  # type: ignore[arg-type]


def test_without_the_instructions_int8_warns_and_computes_exactly(
    write_gguf: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a CPU without AVX2, activations="int8" logs a warning naming what is missing and
    loads the exact layout (no layer packed for int8)."""
    import zigllama_batch.generator

    monkeypatch.setattr(zigllama_batch.generator, "int8_available", lambda: False)
    path = write_gguf(qtypes={"attn_q.weight": Q.Q8_0}, dim=64, ffn_dim=256)
    with caplog.at_level("WARNING", logger="zigllama_batch.generator"):
        model, _ = load_model(path, activations="int8")
    assert "need AVX2 or AVX-512 VNNI" in caplog.text
    assert all(p.packed is None for p in model.weights.layers[0].wqkv.parts)


_AVX2_CHECK = """
import numpy as np, gguf
from gguf import GGMLQuantizationType as Q
from zigllama_batch.engine.kernels import Linear, Weight, dequantize, linear
from zigllama_batch.engine.kernels import dot8
assert dot8.ISA == "avx2", dot8.ISA
rng = np.random.default_rng(0)
for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
    values = rng.standard_normal((40, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    weight = Weight.from_gguf(raw, qtype, 40, 256)
    layer = Linear.of(weight, int8=True)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    x[0, :32] *= 50  # activations of 127: Q8_0 pairs at the edge of int16
    blocks = x.astype(np.float64).reshape(6, -1, 32)
    d = np.abs(blocks).max(axis=2, keepdims=True) / 127
    rounded = (np.rint(blocks / d) * d).reshape(6, 256)
    want = rounded @ dequantize(weight).astype(np.float64).T
    got = linear(x, layer)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), qtype
print("ok")
"""


@pytest.mark.skipif(
    os.environ.get("ZIGLLAMA_BATCH_INT8_ISA") is not None, reason="ISA already forced"
)
def test_the_avx2_kernels_compute_the_same_products(tmp_path: Path) -> None:
    """On a CPU with AVX-512 VNNI, the AVX2 kernels (which other CPUs run) give the same
    products, checked in a process of their own with a cache of its own."""
    from zigllama_batch.engine.kernels import dot8

    if dot8.ISA != "avx512vnni":
        pytest.skip("this CPU runs the AVX2 kernels in every other test")
    env = dict(os.environ, ZIGLLAMA_BATCH_INT8_ISA="avx2", NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", _AVX2_CHECK], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
