"""GGUF file -> :class:`LlamaConfig` + weights, with the ``gguf`` package doing the parsing.

Linear layers and the token embedding stay in their GGUF block types (Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q4_K, Q5_K, Q6_K, F16, BF16; F32 as float32) as :class:`~.kernels.Weight` rows of ``in``
values, split into planes (:mod:`~.kernels.blocks`); the kernels multiply them as they are. A
type the kernels do not read (Q2_K, Q3_K, the IQ types) is dequantized to float32 once, with a
logged warning that says what it costs. Q/K/V are fused into one :class:`~.kernels.Linear`
(and their biases into one vector) and gate/up into another, so each layer runs two big
products instead of five; parts of different types (Q4_K_M files keep V in Q6_K) stay apart
inside it. Norms and biases are float32 vectors. Nothing of the file stays mapped after load.

Which tensors a file must hold, and how they are laid out, follows its row of the architecture
table (:mod:`~zigllama_batch.engine.architecture`): ``llama``, ``qwen2``, ``qwen3`` and
``gemma3``. The model applies RoPE to adjacent pairs of dimensions only, so the Q and K rows
of a "halves" (NEOX) architecture are reordered here, head by head, into adjacent pairs, with
their biases and q/k norm weights. Attention scores are dot products of queries and keys, which
the same reordering of both leaves unchanged. ``llama`` files need nothing: llama.cpp's converter
already permuted their rows.

Progress: ``read_gguf(path, progress=callback)`` calls ``callback`` with a
:class:`LoadProgress` once the file is open and after each tensor is read (tensors and bytes
read so far, out of the file's); nothing is printed.

Simplified: no mixture-of-experts, no split files, no partial rotary dimensions.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
from numpy.typing import NDArray

from ..errors import ModelLoadError
from .architecture import ARCHITECTURES, Architecture, RopeLayout, architecture
from .kernels import FORMATS, Linear, Weight

__all__ = [
    "GGUFContents",
    "LayerWeights",
    "LlamaConfig",
    "LlamaWeights",
    "LoadProgress",
    "LoadProgressCallback",
    "read_gguf",
    "read_gguf_metadata",
]

F32 = NDArray[np.float32]

_GGUF_MAGIC = b"GGUF"

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaConfig:
    """Hyperparameters of a Llama-family model (Llama, Qwen2, Qwen3, Gemma 3), as its GGUF metadata
    states them. Metadata keys are prefixed by the architecture's name (``qwen2.block_count``)."""

    n_layers: int
    """Number of transformer blocks (``block_count``)."""
    dim: int
    """Width of the residual stream (``embedding_length``)."""
    n_heads: int
    """Query heads (``attention.head_count``)."""
    n_kv_heads: int
    """Key/value heads; fewer than ``n_heads`` means grouped-query attention."""
    head_dim: int
    """Width of one attention head: ``attention.key_length`` where the file states it (Qwen3 and
    Gemma 3 heads are wider than ``dim / n_heads``), else ``dim / n_heads``."""
    ffn_dim: int
    """Hidden width of the gated feed-forward (``feed_forward_length``)."""
    context_length: int
    """Longest sequence the model was trained for (``context_length``)."""
    rope_base: float
    """RoPE frequency base (``rope.freq_base``; 10000 when absent)."""
    rope_scale: float
    """Linear RoPE position scaling factor (1 when absent)."""
    rms_eps: float
    """Epsilon of RMSNorm (``attention.layer_norm_rms_epsilon``)."""
    vocab_size: int
    """Rows of the token embedding."""
    tied_embeddings: bool
    """True when the output head reuses the token embedding (no ``output.weight`` tensor)."""
    architecture: Architecture = ARCHITECTURES["llama"]
    """The architecture's row of facts (biases, norms, RoPE layout, activation, windows)."""
    sliding_window: int | None = None
    """Positions a windowed layer attends to, itself included (``attention.sliding_window``);
    None when every layer attends to all earlier positions."""
    name: str = "llama"
    """The file name without ``.gguf``: what the demo, ``generate`` and the server show, and the
    server's default model id, so a user sees one name everywhere. The file's ``general.name``
    is not used: converters fill it with names of their own ("Smollm2 135M 8k Lc100K Mix1
    Ep2" for SmolLM2-135M-Instruct)."""

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ModelLoadError(
                f"inconsistent attention shape: heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelLoadError(f"sliding window must be positive, got {self.sliding_window}")

    @property
    def query_scale(self) -> float:
        """What queries are multiplied by before attention: ``1/sqrt(head_dim)``, or
        ``1/sqrt(dim / n_heads)`` at the depth where the architecture's row says so."""
        wide = self.architecture.wide_query_scale_layers == self.n_layers
        return 1.0 / float(np.sqrt(self.dim / self.n_heads if wide else self.head_dim))

    def window(self, layer: int) -> int | None:
        """Positions ``layer`` attends to (itself included), or None for all earlier ones."""
        if self.sliding_window is None or self.architecture.is_global(layer):
            return None
        return self.sliding_window


@dataclass(slots=True, kw_only=True)
class LayerWeights:
    """One transformer block's weights: linear layers as (out, in) rows in their GGUF types,
    vectors as float32. The optional ones are None where the architecture has no such tensor."""

    attn_norm: F32  # (dim,)
    wqkv: Linear  # ((n_heads + 2 * n_kv_heads) * head_dim, dim): Q rows, then K, then V
    wo: Linear  # (dim, n_heads * head_dim)
    ffn_norm: F32  # (dim,)
    w_gate_up: Linear  # (2 * ffn_dim, dim): gate rows first, then up
    w_down: Linear  # (dim, ffn_dim)
    bqkv: F32 | None = None  # ((n_heads + 2 * n_kv_heads) * head_dim,): Q/K/V biases
    q_norm: F32 | None = None  # (head_dim,): per-head RMSNorm of queries
    k_norm: F32 | None = None  # (head_dim,): per-head RMSNorm of keys
    post_attn_norm: F32 | None = None  # (dim,): RMSNorm of the attention output
    post_ffn_norm: F32 | None = None  # (dim,): RMSNorm of the feed-forward output

    @property
    def linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        """The layer's weight matrices: Q/K/V, the attention output, gate/up and down."""
        return (self.wqkv, self.wo, self.w_gate_up, self.w_down)

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer."""
        vectors = (
            self.attn_norm,
            self.ffn_norm,
            self.bqkv,
            self.q_norm,
            self.k_norm,
            self.post_attn_norm,
            self.post_ffn_norm,
        )
        linears = sum(w.nbytes for w in self.linears)
        return sum(v.nbytes for v in vectors if v is not None) + linears


@dataclass(slots=True, kw_only=True)
class LlamaWeights:
    """All weights of a model."""

    embed: Weight  # (vocab, dim): token embedding, one row per token
    layers: list[LayerWeights]
    output_norm: F32  # (dim,)
    output: Linear  # (vocab, dim): the output head (holding `embed` itself when tied)
    rope_freqs: F32 | None = None  # (head_dim // 2,): Llama 3.1 frequency factors, when present

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights (a tied head counted once)."""
        head = 0 if self.output.parts == (self.embed,) else self.output.nbytes
        extra = self.rope_freqs.nbytes if self.rope_freqs is not None else 0
        layers = sum(layer.nbytes for layer in self.layers)
        return self.embed.nbytes + head + layers + self.output_norm.nbytes + extra


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadProgress:
    """How far loading a model has got, as a progress callback receives it.

    :func:`read_gguf` sends stage ``"tensors"`` once the file is open (nothing read yet) and
    after each tensor; :func:`~zigllama_batch.load_model` then sends ``"tokenizer"`` while it
    builds the tokenizer and ``"ready"`` when the model can run.
    """

    path: Path
    """The GGUF file."""
    stage: Literal["tensors", "tokenizer", "ready"]
    """What is happening: reading (and packing) tensors, building the tokenizer, or done."""
    tensors_done: int
    """Tensors read so far."""
    tensors_total: int
    """Tensors in the file."""
    bytes_done: int
    """The file's bytes of the tensors read so far."""
    bytes_total: int
    """The file's bytes of all its tensors."""


LoadProgressCallback = Callable[[LoadProgress], None]
"""Called with each :class:`LoadProgress`, on the thread that loads; it should return quickly
(loading waits for it)."""


@dataclass(slots=True, kw_only=True)
class GGUFContents:
    """What a GGUF file holds: hyperparameters, weights and the raw metadata (tokenizer etc.)."""

    path: Path
    config: LlamaConfig
    weights: LlamaWeights
    metadata: dict[str, Any]


def read_gguf(
    path: str | os.PathLike[str],
    *,
    progress: LoadProgressCallback | None = None,
    int8_activations: bool = False,
) -> GGUFContents:
    """Read a GGUF file of a supported architecture: its hyperparameters, and its weights in
    their block types (float32 for the types the kernels do not read).

    Args:
        path: the file.
        progress: called with stage ``"tensors"`` once the file is open and after each tensor
            (see :class:`LoadProgress`).
        int8_activations: lay the Q4_0, Q4_1, Q4_K and Q8_0 layers out for products with int8
            activations (:mod:`~zigllama_batch.engine.kernels.int8`), not the exact ones.

    Raises:
        ModelLoadError: the file is missing, is not GGUF, is of an architecture not in
            :data:`~zigllama_batch.engine.architecture.ARCHITECTURES` (the message names it and
            lists those supported), lacks a tensor or metadata key, or has a tensor of the wrong
            shape, cut short, or of a type that cannot be read; the message names the tensor.
    """
    path = Path(path)
    reader, metadata = _open(path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config_from_metadata(metadata, tensors, path)
    as_float: dict[str, int] = {}  # type name -> float32 bytes, for types read as float32
    read = _TensorsRead(path, tensors, progress)
    weights = _load_weights(config, tensors, path, as_float, read.add, int8_activations)
    del reader, tensors  # unmaps the file: the weights are copies
    if as_float:
        listed = ", ".join(f"{name} ({n / 2**20:.0f} MiB)" for name, n in sorted(as_float.items()))
        _log.warning(
            "%s: tensors of type %s are held as float32 (no kernel reads them in place), "
            "%.0f MiB in all",
            path.name,
            listed,
            sum(as_float.values()) / 2**20,
        )
    return GGUFContents(path=path, config=config, weights=weights, metadata=metadata)


class _TensorsRead:
    """Counts the tensors read from a file, telling ``callback`` (when there is one)."""

    def __init__(
        self, path: Path, tensors: dict[str, Any], callback: LoadProgressCallback | None
    ) -> None:
        self.callback = callback
        self.n_bytes = {name: int(t.n_bytes) for name, t in tensors.items()}
        self.progress = LoadProgress(
            path=path,
            stage="tensors",
            tensors_done=0,
            tensors_total=len(tensors),
            bytes_done=0,
            bytes_total=sum(self.n_bytes.values()),
        )
        if callback is not None:
            callback(self.progress)

    def add(self, name: str) -> None:
        """Tensor ``name`` has been read."""
        if self.callback is None:
            return
        p = self.progress
        self.progress = replace(
            p, tensors_done=p.tensors_done + 1, bytes_done=p.bytes_done + self.n_bytes[name]
        )
        self.callback(self.progress)


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read only the metadata of a GGUF file of a supported architecture (no tensor is
    dequantized).

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
        reader = _Reader(path, "r")
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise ModelLoadError(f"cannot parse GGUF file {path}: {exc}") from exc
    order = _byte_order(reader)
    metadata = {name: _field_value(field, order) for name, field in reader.fields.items()}
    try:
        architecture(metadata.get("general.architecture"))
    except KeyError as exc:
        raise ModelLoadError(f"{path}: {exc.args[0]}") from None
    return reader, metadata


class _Reader(gguf.GGUFReader):
    """``gguf.GGUFReader`` with top-level arrays of metadata read whole.

    The stock reader makes two numpy views per element of an array field: 24 s for Gemma 3's
    three 262,144-entry vocabulary arrays, against 0.3 s here. A top-level array of fixed-size
    scalars becomes one typed view, and one of strings one view of its bytes (decoded by
    :func:`_field_value`); every other field, arrays of arrays with all they hold included, is
    read as ``gguf`` reads it.
    """

    _stock = False  # True while gguf reads an array of arrays, inner arrays included

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        # gguf cuts a tensor running past the end of the file short and fails reshaping it,
        # with a message that names no tensor: check every tensor's extent first.
        size = len(self.data)
        for field in fields:
            _, name, _, dims, raw_dtype, offset = field.parts
            qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
            if end > size:
                tensor = bytes(name).decode("utf-8", "replace")
                raise ValueError(f"tensor {tensor!r} runs past the end of the file ({size} bytes)")
        super()._build_tensors(start_offs, fields)

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[NDArray[Any]], list[int], list[gguf.GGUFValueType]]:
        if raw_type != gguf.GGUFValueType.ARRAY or self._stock:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        item_type = gguf.GGUFValueType(int(raw_itype[0]))
        start, count = orig_offs + 12, int(alen[0])
        nptype = self.gguf_scalar_to_np.get(item_type)
        if nptype is not None:
            payload = self._get(start, nptype, count)
            if len(payload) != count:
                raise ValueError(f"an array of {count} values runs past the end of the file")
        elif item_type == gguf.GGUFValueType.STRING:
            data = memoryview(self.data.data)  # the file, not a copy
            last = deque(_string_spans(data, start, count, _byte_order(self)), maxlen=1)
            end = last[0][1] if last else start
            payload = self._get(start, np.uint8, end - start)
        else:  # arrays of arrays: as gguf reads them, inner arrays too
            self._stock = True
            try:
                return super()._get_field_parts(orig_offs, raw_type)
            finally:
                self._stock = False
        size = 12 + int(payload.nbytes)
        return size, [raw_itype, alen, payload], [2], [gguf.GGUFValueType.ARRAY, item_type]


def _string_spans(
    data: bytes | memoryview, start: int, count: int, order: Literal["little", "big"]
) -> Iterator[tuple[int, int]]:
    """Where the bytes of each of ``count`` GGUF strings lie in ``data`` from ``start`` (each
    string: a uint64 length, then its bytes), as ``(first, end)`` offsets.

    Raises:
        ValueError: the strings run past the end of ``data``.
    """
    offset = start
    for _ in range(count):
        first = offset + 8
        if first > len(data):
            raise ValueError(f"an array of {count} strings runs past the end of the file")
        offset = first + int.from_bytes(data[offset:first], order)
        if offset > len(data):
            raise ValueError(f"an array of {count} strings runs past the end of the file")
        yield first, offset


def _byte_order(reader: Any) -> Literal["little", "big"]:
    """The byte order of a reader's file ("S": swapped from this little-endian host's)."""
    return "big" if reader.byte_order == "S" else "little"


def _field_value(field: Any, order: Literal["little", "big"]) -> Any:
    """A metadata field of a :class:`_Reader` as Python values; ``order``: the file's byte
    order."""
    try:
        if len(field.types) == 2 and field.types[0] == gguf.GGUFValueType.ARRAY:
            # A top-level array read whole: its parts end with (item type, count, payload).
            payload = field.parts[field.data[0]]
            if field.types[1] != gguf.GGUFValueType.STRING:
                return payload.tolist()
            data, count = payload.tobytes(), int(field.parts[field.data[0] - 1][0])
            return [data[a:b].decode("utf-8") for a, b in _string_spans(data, 0, count, order)]
        return field.contents()
    except (UnicodeDecodeError, ValueError):
        return None  # a string that is not UTF-8: not a field this library reads


def _config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any], path: Path) -> LlamaConfig:
    arch = architecture(meta["general.architecture"])

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch.name}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: metadata key '{arch.name}.{key}' is missing")
        return value

    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # GGUF shapes list ne0 (dim) first
    scaling_type = get("rope.scaling.type", "none")
    rope_scale = 1.0
    if scaling_type == "linear":
        rope_scale = float(get("rope.scaling.factor", 1.0))
    elif scaling_type not in ("none", None):
        raise ModelLoadError(f"{path}: RoPE scaling {scaling_type!r} is not supported")
    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", dim // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: keys and values of different widths are not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: RoPE over part of a head is not supported")
    window = get("attention.sliding_window", 0) if arch.global_every else 0
    return LlamaConfig(
        n_layers=int(get("block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        context_length=int(get("context_length")),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_scale=rope_scale,
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=vocab_size,
        tied_embeddings="output.weight" not in tensors,
        architecture=arch,
        sliding_window=int(window) or None,
        name=path.name.removesuffix(".gguf"),
    )


def _load_weights(
    config: LlamaConfig,
    tensors: dict[str, Any],
    path: Path,
    as_float: dict[str, int],
    read: Callable[[str], None],
    int8: bool = False,
) -> LlamaWeights:
    """The weights, each tensor reported to ``read`` by name once it is read."""
    arch, d, hd = config.architecture, config.dim, config.head_dim
    q_out, kv_out = config.n_heads * hd, config.n_kv_heads * hd
    # Within each head, the order that turns "halves" RoPE pairs (i, i + hd/2) into adjacent
    # ones (2i, 2i + 1); the identity for files already in adjacent order.
    if arch.rope_layout is RopeLayout.HALVES:
        in_head = np.stack([np.arange(hd // 2), np.arange(hd // 2) + hd // 2], axis=1).ravel()
    else:
        in_head = None

    def order(n_heads: int) -> NDArray[np.int64]:
        assert in_head is not None
        return (np.arange(n_heads)[:, None] * hd + in_head).ravel()

    def matrix(name: str, n_out: int, n_in: int, heads: int = 0) -> Weight:
        """A linear layer's (out, in) rows; ``heads``: rows of that many heads to reorder."""
        w = _weight(tensors, name, n_out, n_in, path, as_float)
        read(name)
        return w.take(order(heads)) if heads and in_head is not None else w

    def vector(name: str, n: int, heads: int = 0) -> F32:
        v = _vector(tensors, name, n, path)
        read(name)
        return np.ascontiguousarray(v[order(heads)]) if heads and in_head is not None else v

    layers = []
    for i in range(config.n_layers):
        p = f"blk.{i}."
        layer = LayerWeights(
            attn_norm=vector(p + "attn_norm.weight", d),
            wqkv=Weight.concat(
                [
                    matrix(p + "attn_q.weight", q_out, d, config.n_heads),
                    matrix(p + "attn_k.weight", kv_out, d, config.n_kv_heads),
                    matrix(p + "attn_v.weight", kv_out, d),
                ],
                int8=int8,
            ),
            wo=Linear.of(matrix(p + "attn_output.weight", d, q_out), int8=int8),
            ffn_norm=vector(p + "ffn_norm.weight", d),
            w_gate_up=Weight.concat(
                [
                    matrix(p + "ffn_gate.weight", config.ffn_dim, d),
                    matrix(p + "ffn_up.weight", config.ffn_dim, d),
                ],
                int8=int8,
            ),
            w_down=Linear.of(matrix(p + "ffn_down.weight", d, config.ffn_dim), int8=int8),
        )
        if arch.qkv_bias:
            layer.bqkv = np.concatenate(
                [
                    vector(p + "attn_q.bias", q_out, config.n_heads),
                    vector(p + "attn_k.bias", kv_out, config.n_kv_heads),
                    vector(p + "attn_v.bias", kv_out),
                ]
            )
        if arch.qk_norm:
            layer.q_norm = vector(p + "attn_q_norm.weight", hd, 1)
            layer.k_norm = vector(p + "attn_k_norm.weight", hd, 1)
        if arch.sandwich_norms:
            layer.post_attn_norm = vector(p + "post_attention_norm.weight", d)
            layer.post_ffn_norm = vector(p + "post_ffw_norm.weight", d)
        layers.append(layer)
    embed = matrix("token_embd.weight", config.vocab_size, d)
    if config.tied_embeddings:  # one copy, as tiles: the head multiplies it, look-ups decode it
        output = Linear.of(embed, int8=int8)
        embed = output.parts[0]
    else:
        output = Linear.of(matrix("output.weight", config.vocab_size, d), int8=int8)
    rope_freqs = vector("rope_freqs.weight", hd // 2) if "rope_freqs.weight" in tensors else None
    return LlamaWeights(
        embed=embed,
        layers=layers,
        output_norm=vector("output_norm.weight", d),
        output=output,
        rope_freqs=rope_freqs,
    )


def _tensor(tensors: dict[str, Any], name: str, shape: tuple[int, ...], path: Path) -> Any:
    """The tensor ``name``, checked to hold ``shape`` (numpy order: rows first) whole."""
    tensor = tensors.get(name)
    if tensor is None:
        raise ModelLoadError(f"{path}: tensor {name!r} is missing")
    if tuple(int(n) for n in reversed(tensor.shape)) != shape:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has shape {tuple(int(n) for n in tensor.shape)}, "
            f"expected {tuple(reversed(shape))} (GGUF order)"
        )
    return tensor


def _weight(
    tensors: dict[str, Any],
    name: str,
    rows: int,
    cols: int,
    path: Path,
    as_float: dict[str, int],
) -> Weight:
    """A matrix tensor as a :class:`Weight`: in its blocks where a kernel reads the type, else
    dequantized (its float32 bytes counted into ``as_float`` by type name)."""
    tensor = _tensor(tensors, name, (rows, cols), path)
    qtype = tensor.tensor_type
    try:
        if qtype in FORMATS or qtype == gguf.GGMLQuantizationType.F32:
            return Weight.from_gguf(tensor.data, qtype, rows, cols)
        values = _dequantize(tensor, name, (rows, cols), path)
    except ValueError as exc:  # a tensor cut short, or holding too few blocks
        raise ModelLoadError(f"{path}: tensor {name!r} cannot be read: {exc}") from exc
    as_float[qtype.name] = as_float.get(qtype.name, 0) + values.nbytes
    return Weight.from_float(values)


def _vector(tensors: dict[str, Any], name: str, n: int, path: Path) -> F32:
    """A vector tensor (norm weights, biases) as float32, a copy of the file's bytes."""
    tensor = _tensor(tensors, name, (n,), path)
    try:
        return np.array(_dequantize(tensor, name, (n,), path), dtype=np.float32)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: tensor {name!r} cannot be read: {exc}") from exc


def _dequantize(tensor: Any, name: str, shape: tuple[int, ...], path: Path) -> F32:
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has type {tensor.tensor_type.name}, which cannot be "
            f"dequantized"
        ) from exc
    return np.asarray(array, dtype=np.float32).reshape(shape)
