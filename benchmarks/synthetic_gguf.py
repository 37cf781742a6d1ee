"""Llama-shaped GGUF files of a given size class, random weights, for speed and memory runs.

The blocks are written directly (random quants, float16 scales of a trained model's order of
magnitude; no float32 detour, so an 8B file takes a minute, not an hour), tensor by tensor, so
writing never holds more than one tensor. The tokenizer (vocabulary, merges, special tokens,
chat template) is copied from the default model, SmolLM2-135M-Instruct, so both this library
and llama.cpp load the file and tokenize text with it. The text such a model writes is noise;
its speed and memory are those of a real model of its shape.

    python benchmarks/synthetic_gguf.py --size 1b --type q8_0 [--out DIR]

Sizes: ``1b`` (Llama-3.2-1B's shape: width 2048, 16 layers, 32/8 heads, FFN 8192, tied
embeddings) and ``8b`` (Llama-3-8B's: width 4096, 32 layers, 32/8 heads, FFN 14336, its own
output head); both with SmolLM2's 49,152-token vocabulary. Types: ``q8_0``, ``q4_0``,
``q4_k``. Writes ``synthetic-SIZE.TYPE.gguf`` into ``--out`` (default
``benchmarks/models``; ``*.gguf`` is ignored by git).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from zigllama_batch.engine.gguf_loader import read_gguf_metadata
from zigllama_batch.engine.hub import default_model_path


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    tied: bool
    vocab: int = 49152


SIZES = {
    "1b": Shape(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tied=True),
    "8b": Shape(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, tied=False),
}
TYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k": Q.Q4_K}
FILE_TYPES = {
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
}
WEIGHT_STD = 0.02
"""Standard deviation of the weights the blocks stand for: a trained Llama's order."""


def tensors(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor's name and (rows, cols) shape (numpy order), in llama.cpp's naming."""
    d, hd = shape.dim, shape.dim // shape.n_heads
    kv = shape.n_kv_heads * hd
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (shape.vocab, d))]
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (d,)),
            (p + "attn_q.weight", (d, d)),
            (p + "attn_k.weight", (kv, d)),
            (p + "attn_v.weight", (kv, d)),
            (p + "attn_output.weight", (d, d)),
            (p + "ffn_norm.weight", (d,)),
            (p + "ffn_gate.weight", (shape.ffn_dim, d)),
            (p + "ffn_up.weight", (shape.ffn_dim, d)),
            (p + "ffn_down.weight", (d, shape.ffn_dim)),
        ]
    out.append(("output_norm.weight", (d,)))
    if not shape.tied:
        out.append(("output.weight", (shape.vocab, d)))
    return out


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """float16 values as (..., 2) little-endian bytes."""
    return values.astype("<f2").view(np.uint8).reshape(*values.shape, 2)


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` rows of ``cols`` values of ``qtype`` as raw blocks (rows, bytes per row):
    random quants, scales such that the values spread like WEIGHT_STD."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    blocks = np.empty((n, size), np.uint8)
    if qtype == Q.Q8_0:  # d * q, q in [-127, 127]
        blocks[:, 0:2] = _f16_bytes(np.full(n, WEIGHT_STD * 3 / 127, np.float32))
        blocks[:, 2:] = rng.integers(-127, 128, (n, 32), dtype=np.int8).view(np.uint8)
    elif qtype == Q.Q4_0:  # d * (q - 8), q in [0, 15]
        blocks[:, 0:2] = _f16_bytes(np.full(n, WEIGHT_STD * 3 / 8, np.float32))
        blocks[:, 2:] = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    else:  # Q4_K: d * sc * q - dmin * m, 6-bit sub-block scales and minimums
        blocks[:, 0:2] = _f16_bytes(np.full(n, WEIGHT_STD * 6 / (15 * 32), np.float32))
        blocks[:, 2:4] = _f16_bytes(np.full(n, WEIGHT_STD * 3 / 32, np.float32))
        blocks[:, 4:16] = rng.integers(24, 40, (n, 12), dtype=np.uint8)  # scales and mins ~32
        blocks[:, 16:] = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write(size: str, type_name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write ``synthetic-SIZE.TYPE.gguf`` into ``out_dir`` and return its path."""
    shape, qtype = SIZES[size], TYPES[type_name]
    path = out_dir / f"synthetic-{size}.{type_name}.gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_gguf_metadata(default_model_path(progress=False))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"synthetic {size} {type_name}")
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_block_count(shape.n_layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(shape.dim)
    writer.add_feed_forward_length(shape.ffn_dim)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape.vocab)
    writer.add_rope_dimension_count(shape.dim // shape.n_heads)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(bool(meta["tokenizer.ggml.add_bos_token"]))
    writer.add_chat_template(meta["tokenizer.chat_template"])

    rng = np.random.default_rng(seed)
    plan = tensors(shape)
    for name, dims in plan:  # every tensor's header first, then the data one by one
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4, Q.F32)
        else:
            block, size_b = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = dims[1] // block * size_b  # gguf takes a quantized shape in bytes
            byte_shape = (dims[0], row_bytes)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), dims[0] * row_bytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, dims in plan:
        if len(dims) == 1:
            data = (1.0 + 0.05 * rng.standard_normal(dims[0])).astype(np.float32)
        else:
            data = random_blocks(qtype, dims[0], dims[1], rng)
        writer.write_tensor_data(data)
    writer.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--type", choices=sorted(TYPES), default="q8_0")
    ap.add_argument("--out", default=str(Path(__file__).parent / "models"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = write(args.size, args.type, Path(args.out))
    size_mib = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mib:.0f} MiB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
