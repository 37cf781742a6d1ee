"""GGUF file -> :class:`LlamaConfig` + float32 weights, with the ``gguf`` package doing the parsing.

Every tensor is dequantized to float32 once, at load (``gguf.quants.dequantize`` knows F32, F16,
BF16, the legacy Q4/Q5/Q8 types and the K-quants). Weights are stored ready for the forward pass:
linear layers as ``(in, out)`` C-contiguous matrices, Q/K/V fused into one matrix and gate/up into
another, so each layer runs two big matrix multiplies instead of five.

The Q and K weights stay in the row order llama.cpp's converter wrote them in (it permutes them so
that RoPE rotates *adjacent* pairs of dimensions); the model applies RoPE in that same layout.

Simplified: only the ``llama`` architecture (Llama 1/2/3, TinyLlama, SmolLM, Mistral-style dense
models); no mixture-of-experts, no split files, no attention or MLP biases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from numpy.typing import NDArray

from ..errors import ModelLoadError

__all__ = [
    "GGUFContents",
    "LayerWeights",
    "LlamaConfig",
    "LlamaWeights",
    "read_gguf",
    "read_gguf_metadata",
]

F32 = NDArray[np.float32]

_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaConfig:
    """Hyperparameters of a Llama-architecture model, as its GGUF metadata states them."""

    n_layers: int
    """Number of transformer blocks (``llama.block_count``)."""
    dim: int
    """Width of the residual stream (``llama.embedding_length``)."""
    n_heads: int
    """Query heads (``llama.attention.head_count``)."""
    n_kv_heads: int
    """Key/value heads; fewer than ``n_heads`` means grouped-query attention."""
    ffn_dim: int
    """Hidden width of the SwiGLU feed-forward (``llama.feed_forward_length``)."""
    context_length: int
    """Longest sequence the model was trained for (``llama.context_length``)."""
    rope_base: float
    """RoPE frequency base (``llama.rope.freq_base``; 10000 when absent)."""
    rope_scale: float
    """Linear RoPE position scaling factor (1 when absent)."""
    rms_eps: float
    """Epsilon of RMSNorm (``llama.attention.layer_norm_rms_epsilon``)."""
    vocab_size: int
    """Rows of the token embedding."""
    tied_embeddings: bool
    """True when the output head reuses the token embedding (no ``output.weight`` tensor)."""
    name: str = "llama"
    """The file name without ``.gguf``: what the demo, ``generate`` and the server show, and the
    server's default model id, so a user sees one name everywhere. The file's ``general.name``
    is not used: converters fill it with names of their own ("Smollm2 135M 8k Lc100K Mix1
    Ep2" for SmolLM2-135M-Instruct)."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ModelLoadError(
                f"inconsistent attention shape: dim={self.dim}, heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}"
            )


@dataclass(slots=True, kw_only=True)
class LayerWeights:
    """One transformer block's weights, float32, linear layers as ``(in, out)``."""

    attn_norm: F32  # (dim,)
    wqkv: F32  # (dim, (n_heads + 2 * n_kv_heads) * head_dim)
    wo: F32  # (n_heads * head_dim, dim)
    ffn_norm: F32  # (dim,)
    w_gate_up: F32  # (dim, 2 * ffn_dim): gate columns first, then up
    w_down: F32  # (ffn_dim, dim)


@dataclass(slots=True, kw_only=True)
class LlamaWeights:
    """All weights of a model, float32."""

    embed_t: F32  # (dim, vocab): token embedding, transposed so the output head is a plain x @ W
    layers: list[LayerWeights]
    output_norm: F32  # (dim,)
    output: F32  # (dim, vocab): the output head (the same array as embed_t when tied)
    rope_freqs: F32 | None = None  # (head_dim // 2,): Llama 3.1 frequency factors, when present

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights (a tied head counted once)."""
        arrays: list[F32] = [self.embed_t, self.output_norm]
        if self.output is not self.embed_t:
            arrays.append(self.output)
        for layer in self.layers:
            arrays += [
                layer.attn_norm,
                layer.wqkv,
                layer.wo,
                layer.ffn_norm,
                layer.w_gate_up,
                layer.w_down,
            ]
        return sum(a.nbytes for a in arrays)


@dataclass(slots=True, kw_only=True)
class GGUFContents:
    """What a GGUF file holds: hyperparameters, weights and the raw metadata (tokenizer etc.)."""

    path: Path
    config: LlamaConfig
    weights: LlamaWeights
    metadata: dict[str, Any]


def read_gguf(path: str | os.PathLike[str]) -> GGUFContents:
    """Read a Llama-architecture GGUF file and dequantize its weights to float32.

    Raises:
        ModelLoadError: the file is missing, is not GGUF, is not a llama model, lacks a tensor or
            has a tensor of the wrong shape or of a type ``gguf`` cannot dequantize.
    """
    path = Path(path)
    reader, metadata = _open(path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config_from_metadata(metadata, tensors, path)
    weights = _load_weights(config, tensors, path)
    return GGUFContents(path=path, config=config, weights=weights, metadata=metadata)


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read only the metadata of a Llama-architecture GGUF file (no tensor is dequantized).

    Raises:
        ModelLoadError: as :func:`read_gguf`, for the file itself and its architecture.
    """
    return _open(Path(path))[1]


def _open(path: Path) -> tuple[Any, dict[str, Any]]:
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf"))[:3]
        hint = f" (this one holds {', '.join(found)})" if found else ""
        raise ModelLoadError(f"{path} is a directory: a GGUF model file (.gguf) is expected{hint}")
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ModelLoadError(f"not a GGUF file (bad magic bytes): {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise ModelLoadError(f"cannot parse GGUF file {path}: {exc}") from exc
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"{path}: architecture {arch!r} is not supported (only 'llama' models are)"
        )
    return reader, metadata


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError):
        return None  # a string that is not UTF-8: not a field this library reads


def _config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any], path: Path) -> LlamaConfig:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: metadata key 'llama.{key}' is missing")
        return value

    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # GGUF shapes list ne0 (dim) first
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    rope_scale = 1.0
    if scaling_type == "linear":
        rope_scale = float(meta.get("llama.rope.scaling.factor", 1.0))
    elif scaling_type not in ("none", None):
        raise ModelLoadError(f"{path}: RoPE scaling {scaling_type!r} is not supported")
    return LlamaConfig(
        n_layers=int(get("block_count")),
        dim=int(get("embedding_length")),
        n_heads=int(get("attention.head_count")),
        n_kv_heads=int(get("attention.head_count_kv", get("attention.head_count"))),
        ffn_dim=int(get("feed_forward_length")),
        context_length=int(get("context_length")),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_scale=rope_scale,
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=vocab_size,
        tied_embeddings="output.weight" not in tensors,
        name=path.name.removesuffix(".gguf"),
    )


def _load_weights(config: LlamaConfig, tensors: dict[str, Any], path: Path) -> LlamaWeights:
    d, hd = config.dim, config.head_dim
    q_out, kv_out = config.n_heads * hd, config.n_kv_heads * hd

    def matrix(name: str, n_in: int, n_out: int) -> F32:
        """A linear layer as (in, out), from GGUF's (out rows of in values)."""
        return np.ascontiguousarray(_dequantize(tensors, name, (n_out, n_in), path).T)

    def vector(name: str, n: int) -> F32:
        return _dequantize(tensors, name, (n,), path)

    layers = []
    for i in range(config.n_layers):
        p = f"blk.{i}."
        layers.append(
            LayerWeights(
                attn_norm=vector(p + "attn_norm.weight", d),
                wqkv=np.concatenate(
                    [
                        matrix(p + "attn_q.weight", d, q_out),
                        matrix(p + "attn_k.weight", d, kv_out),
                        matrix(p + "attn_v.weight", d, kv_out),
                    ],
                    axis=1,
                ),
                wo=matrix(p + "attn_output.weight", q_out, d),
                ffn_norm=vector(p + "ffn_norm.weight", d),
                w_gate_up=np.concatenate(
                    [
                        matrix(p + "ffn_gate.weight", d, config.ffn_dim),
                        matrix(p + "ffn_up.weight", d, config.ffn_dim),
                    ],
                    axis=1,
                ),
                w_down=matrix(p + "ffn_down.weight", config.ffn_dim, d),
            )
        )
    embed_t = matrix("token_embd.weight", d, config.vocab_size)  # (dim, vocab)
    output = embed_t if config.tied_embeddings else matrix("output.weight", d, config.vocab_size)
    rope_freqs = (
        _dequantize(tensors, "rope_freqs.weight", (hd // 2,), path)
        if "rope_freqs.weight" in tensors
        else None
    )
    return LlamaWeights(
        embed_t=embed_t,
        layers=layers,
        output_norm=vector("output_norm.weight", d),
        output=output,
        rope_freqs=rope_freqs,
    )


def _dequantize(tensors: dict[str, Any], name: str, shape: tuple[int, ...], path: Path) -> F32:
    tensor = tensors.get(name)
    if tensor is None:
        raise ModelLoadError(f"{path}: tensor {name!r} is missing")
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has type {tensor.tensor_type.name}, which cannot be "
            f"dequantized"
        ) from exc
    array = np.asarray(array, dtype=np.float32)
    if array.shape != shape:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has shape {tuple(int(n) for n in tensor.shape)}, "
            f"expected {tuple(reversed(shape))} (GGUF order)"
        )
    return array
