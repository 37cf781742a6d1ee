"""GGUF loading: hyperparameters from metadata, dequantization, and a typed error for every way
a file can be unusable."""

from __future__ import annotations

import gc
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from tiny_gguf import K_QUANTS, file_tensors

from zigllama_batch import ModelLoadError, load_model
from zigllama_batch.engine import LlamaConfig, LoadProgress, SequenceStep, read_gguf
from zigllama_batch.engine.architecture import ARCHITECTURES
from zigllama_batch.engine.gguf_loader import read_gguf_metadata
from zigllama_batch.engine.kernels import FORMATS, Weight, dequantize


def test_config_comes_from_metadata(write_gguf: Callable[..., Path]) -> None:
    """Every hyperparameter is read from the file, and tied heads are detected."""
    path = write_gguf(
        n_layers=3,
        dim=96,
        n_heads=6,
        n_kv_heads=2,
        ffn_dim=160,
        context_length=300,
        rope_base=50000.0,
        rms_eps=1e-6,
        tied=False,
    )
    c = read_gguf(path).config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim) == (3, 96, 6, 2, 160)
    assert (c.context_length, c.rope_base, c.head_dim) == (300, 50000.0, 16)
    assert c.rms_eps == pytest.approx(1e-6)
    assert c.vocab_size == 3 + 256 + 34
    assert not c.tied_embeddings
    assert read_gguf(write_gguf("tied.gguf", tied=True)).config.tied_embeddings


def test_the_model_is_named_by_its_file(write_gguf: Callable[..., Path]) -> None:
    """The model's name is its file name without .gguf, not the file's general.name."""
    path = write_gguf("SmolTest-1M.Q4_1.gguf")
    assert gguf.GGUFReader(path).get_field("general.name").contents() == "tiny-test-llama"
    assert read_gguf(path).config.name == "SmolTest-1M.Q4_1"


def test_reading_reports_each_tensor_read(tiny_path: Path) -> None:
    """read_gguf tells its progress callback once the file is open (nothing read) and after
    each tensor, counting up to every tensor and byte of the file."""
    updates: list[LoadProgress] = []
    read_gguf(tiny_path, progress=updates.append)
    first, last = updates[0], updates[-1]
    assert (first.tensors_done, first.bytes_done) == (0, 0)
    assert [u.tensors_done for u in updates] == list(range(len(updates)))
    assert all(a.bytes_done < b.bytes_done for a, b in itertools.pairwise(updates))
    assert (last.tensors_done, last.bytes_done) == (last.tensors_total, last.bytes_total)
    assert last.tensors_total == len(gguf.GGUFReader(tiny_path).tensors)
    assert {u.stage for u in updates} == {"tensors"}
    assert {u.path for u in updates} == {tiny_path}


def test_load_model_reports_the_tokenizer_then_ready(tiny_path: Path) -> None:
    """load_model passes the tensors' progress on, then says it builds the tokenizer, then
    that the model is ready, with the file's totals."""
    updates: list[LoadProgress] = []
    load_model(tiny_path, on_progress=updates.append)
    stages = [u.stage for u in updates]
    assert stages[-2:] == ["tokenizer", "ready"]
    assert set(stages[:-2]) == {"tensors"}
    ready = updates[-1]
    assert ready.tensors_done == ready.tensors_total > 0


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, *K_QUANTS]
)
def test_every_quant_type_is_kept_as_the_file_stores_it(
    write_gguf: Callable[..., Path], qtype: Q, caplog: pytest.LogCaptureFixture
) -> None:
    """A weight of a type the kernels read stays in that type, one the kernels do not read is
    held as float32 with a warning that names its cost, and either way its values are the gguf
    package's dequantization of the stored tensor."""
    path = write_gguf(
        qtypes={"ffn_down.weight": qtype, "ffn_up.weight": qtype}
        if qtype not in K_QUANTS
        else {"ffn_down.weight": qtype}
    )
    with caplog.at_level(logging.WARNING):
        contents = read_gguf(path)
    raw = file_tensors(path)
    (weight,) = contents.weights.layers[1].w_down.parts
    kept = qtype in FORMATS
    assert weight.qtype == (qtype if kept else Q.F32)
    assert (weight.tiles is not None) == kept  # laid out for products
    np.testing.assert_array_equal(dequantize(weight), raw["blk.1.ffn_down.weight"])
    if kept:
        assert not caplog.records
    else:
        assert f"{qtype.name} (0 MiB)" in caplog.text
        assert "held as float32" in caplog.text
    model, _ = load_model(path)
    logits = model.step([SequenceStep(0, [5, 6, 7], 0)], model.new_cache(1, 16))
    assert np.isfinite(logits).all()


def test_missing_file(tmp_path: Path) -> None:
    """A path that does not exist raises ModelLoadError naming it."""
    with pytest.raises(ModelLoadError, match=r"not found.*nope\.gguf"):
        load_model(tmp_path / "nope.gguf")


def test_a_directory_is_named_as_one(tmp_path: Path) -> None:
    """A directory passed as the model says it is a directory, a .gguf file is expected, and
    names the GGUF files inside it."""
    (tmp_path / "model.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert f"{tmp_path} is a directory" in message
    assert ".gguf" in message
    assert "model.Q4_0.gguf" in message
    assert "not found" not in message


def test_not_a_gguf_file(tmp_path: Path) -> None:
    """A file without the GGUF magic raises ModelLoadError."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(path)


def test_truncated_gguf_file(tmp_path: Path, tiny_path: Path) -> None:
    """A GGUF file cut short raises ModelLoadError, not a parser's internal exception."""
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_path.read_bytes()[:5000])
    with pytest.raises(ModelLoadError):
        load_model(path)


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "gemma2"])
def test_other_architecture(write_gguf: Callable[..., Path], arch: str) -> None:
    """A model of an unsupported architecture is refused at load, with an error that names it
    and lists the supported ones."""
    with pytest.raises(ModelLoadError) as info:
        load_model(write_gguf(arch=arch))
    assert f"architecture '{arch}' is not supported" in str(info.value)
    assert "supported: llama, qwen2, qwen3, gemma3" in str(info.value)


@pytest.mark.parametrize(
    "tensor", ["blk.1.attn_k.weight", "output_norm.weight", "token_embd.weight"]
)
def test_missing_tensor(write_gguf: Callable[..., Path], tensor: str) -> None:
    """A file without a required tensor raises ModelLoadError naming the tensor."""
    with pytest.raises(ModelLoadError, match=f"'{tensor}' is missing"):
        load_model(write_gguf(drop_tensors=[tensor]))


def test_missing_metadata_key(write_gguf: Callable[..., Path]) -> None:
    """A file without a required hyperparameter raises ModelLoadError naming the key."""
    with pytest.raises(ModelLoadError, match=r"llama\.block_count"):
        load_model(write_gguf(drop_keys=["block_count"]))


def rewrite_tensor(source: Path, target: Path, name: str, data: np.ndarray, qtype: Q) -> Path:
    """Copy the GGUF file ``source`` to ``target`` with tensor ``name``'s data replaced."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name == name:
            writer.add_tensor(t.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.asarray(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_wrong_tensor_shape(write_gguf: Callable[..., Path], tmp_path: Path) -> None:
    """A tensor whose shape disagrees with the metadata raises ModelLoadError naming it."""
    good = write_gguf()
    gate = next(t for t in gguf.GGUFReader(str(good)).tensors if t.name == "blk.0.ffn_gate.weight")
    short = np.ascontiguousarray(np.asarray(gate.data)[:-1])  # one output row short
    bad = rewrite_tensor(good, tmp_path / "bad.gguf", gate.name, short, Q.F32)
    with pytest.raises(ModelLoadError, match=r"'blk\.0\.ffn_gate\.weight' has shape"):
        load_model(bad)


def test_tensor_data_cut_short_is_named(write_gguf: Callable[..., Path], tmp_path: Path) -> None:
    """A quantized file whose last tensor's blocks are cut short raises ModelLoadError naming a
    tensor, and no weight of the half-read file stays alive."""
    good = write_gguf(qtypes=dict.fromkeys(["attn_q.weight", "ffn_up.weight"], Q.Q8_0))
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:-100])
    gc.collect()
    before = sum(isinstance(o, Weight) for o in gc.get_objects())
    with pytest.raises(ModelLoadError, match=r"tensor '[a-z0-9_.]+'"):
        load_model(bad)
    gc.collect()
    assert sum(isinstance(o, Weight) for o in gc.get_objects()) == before


def test_a_type_nothing_can_read_is_named(write_gguf: Callable[..., Path], tmp_path: Path) -> None:
    """A tensor of a type neither the kernels nor gguf's dequantize read (Q8_1) raises
    ModelLoadError naming the tensor and the type."""
    raw = np.zeros((256, 2 * 40), np.uint8)  # ffn_up (256, 64) values: 256 rows of 2 Q8_1 blocks
    bad = rewrite_tensor(write_gguf(), tmp_path / "q8_1.gguf", "blk.1.ffn_up.weight", raw, Q.Q8_1)
    with pytest.raises(ModelLoadError, match=r"'blk\.1\.ffn_up\.weight' has type Q8_1"):
        load_model(bad)


def test_metadata_arrays_read_whole_equal_what_gguf_reads(
    write_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    """Every metadata field, arrays of strings, of numbers and of arrays included, reads as the
    ``gguf`` package reads it."""
    path = write_gguf(vocab="spm")
    nested = tmp_path / "nested.gguf"
    writer = gguf.GGUFWriter(str(nested), "llama")
    writer.add_array("test.nested", [["ab", "c"], ["d"]])
    writer.add_array("test.numbers", [1, 2, 3])
    writer.add_array("test.empty", [])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    for p in (path, nested):
        stock = {k: f.contents() for k, f in gguf.GGUFReader(p).fields.items()}
        assert read_gguf_metadata(p) == stock


def test_a_string_array_longer_than_the_file_is_refused_at_once(
    write_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    """A vocabulary whose declared count runs past the end of the file raises ModelLoadError
    instead of reading on."""
    data = bytearray(write_gguf().read_bytes())
    key = b"tokenizer.ggml.tokens"
    count_at = data.index(key) + len(key) + 8  # after the value type and the item type
    data[count_at : count_at + 8] = (2**40).to_bytes(8, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="runs past the end of the file"):
        read_gguf_metadata(bad)


def test_gemma3_27b_scales_queries_by_width_over_heads() -> None:
    """Gemma 3 27B (62 layers) scales queries by 1/sqrt(dim / heads), as llama.cpp does; other
    depths by 1/sqrt(head_dim)."""

    def config(n_layers: int) -> LlamaConfig:
        return LlamaConfig(
            n_layers=n_layers, dim=5376, n_heads=32, n_kv_heads=16, head_dim=128,
            ffn_dim=21504, context_length=8192, rope_base=1e6, rope_scale=8.0, rms_eps=1e-6,
            vocab_size=262144, tied_embeddings=True, architecture=ARCHITECTURES["gemma3"],
            sliding_window=1024,
        )  # fmt: skip

    assert config(62).query_scale == pytest.approx(168**-0.5)
    assert config(48).query_scale == pytest.approx(128**-0.5)
