"""Weights kept as GGUF stores them, and the one entry point the forward pass calls for a
linear layer: :func:`linear`; the rest of a block's compiled work: attention
(:func:`attend_decode` for decode tokens, :func:`attend_prefill` for a prompt chunk),
:func:`rms_norm` and :func:`gated_activation`.

Inside: :class:`Weight` (one matrix of one GGUF type: block planes, or float32 for the types
read as float32), :class:`Linear` (the row-wise concatenation of weights that one product
computes at once, e.g. Q, K and V), :func:`linear`, :func:`embedding_rows` and
:func:`dequantize`.

Which kernel runs is decided here, by the number of activation rows (measured on this
project's 2-core machine; ``benchmarks/kernels.py`` reruns the measurement):

- up to :data:`GEMV_MAX_ROWS` rows (decode, a few streams, a sequence verifying drafted
  tokens; per type): a kernel that reads each weight byte once and decodes it in cache. Q8_0,
  Q4_0, Q4_1, Q5_0 and Q5_1: :func:`~.matmul.gemv_registers` (:mod:`.dotf`: partial sums in
  registers, three rows a pass), or at one row of Q4_0 and Q4_1 :func:`~.matmul.gemv_nibbles`;
  at one row the time is the bytes read. Other types: :func:`~.matmul.gemv_fused`.
- more rows (batched decode, prompt chunks): :func:`~.matmul.gemm`, L2-sized tiles of
  decoded rows multiplied by BLAS.
- float32 weights: numpy's BLAS.
- with int8 activations (``Linear(..., int8=True)``, opt-in: ``load_model(activations=
  "int8")``), Q4_0, Q4_1, Q4_K and Q8_0 weights at every row count: :func:`~.int8.packed_product`,
  integer dot products of the weights' bytes and the activations rounded to int8 (:mod:`.int8`,
  llama.cpp's arithmetic; not the exact values).

Compiled kernels are cached on disk (numba's ``cache=True``, in ``__pycache__``): the first
process compiles them (about 25 s), later ones load them. numba checks only the entry points'
own file (``matmul.py``) for changes: after editing ``blocks.py``, ``tiles.py`` or
``bytes8.py``, delete ``__pycache__/*.nbi`` and ``*.nbc`` here (or touch ``matmul.py``).

Threads: the numba kernels use numba's pool (as many threads as cores, or
:func:`set_threads`), numpy's BLAS its own; the two never run at once. The tiles' BLAS calls
run inside numba's threads, so scipy's BLAS, which they call, is held to one thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGMLQuantizationType as Q
from numpy.typing import NDArray
from threadpoolctl import ThreadpoolController

from ... import _blas_env
from .attention import decode_attention, prefill_attention, rope_store, rope_store_parallel
from .blocks import FORMATS, Planes, pack
from .elementwise import (
    GELU_TANH,
    MANY_ROWS,
    SILU,
    gated,
    rms_parallel,
    rms_serial,
)
from .int8 import TYPES as INT8_TYPES
from .int8 import Packed, packed_product, packed_rows, quantize
from .matmul import (
    decode_rows,
    decode_tiles,
    gemm,
    gemv,
    gemv_fused,
    gemv_nibbles,
    gemv_registers,
    tile_rows,
)
from .tiles import TILE, Tiles

__all__ = [
    "FORMATS",
    "GEMV_MAX_ROWS",
    "Linear",
    "Weight",
    "attend_decode",
    "attend_prefill",
    "dequantize",
    "embedding_rows",
    "few_rows_product",
    "gated_activation",
    "linear",
    "rms_norm",
    "rotate_and_store",
    "set_threads",
]

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]

GEMV_MAX_ROWS: dict[Q, int] = {
    Q.Q8_0: 48,
    Q.Q4_0: 48,
    Q.Q4_1: 48,
    Q.Q5_0: 16,
    Q.Q5_1: 16,
    Q.Q4_K: 8,
    Q.Q5_K: 6,
    Q.Q6_K: 4,
    Q.F16: 2,
    Q.BF16: 2,
}
"""Most activation rows multiplied by a matrix-vector kernel, per type; more go to the tiled
BLAS product. Where they cross over (``python benchmarks/kernels.py``: an 8192 x 2048 matrix
read from memory, 2 threads, AMD EPYC Zen 4; ``benchmarks/results/kernels.json``): the types
Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 take :func:`~.matmul.gemv_registers`, whose partial sums stay in
registers (Q4_0: 1.97 ms at 8 rows, 7.5 at 32, 10.9 at 48, 14.6 at 64; the BLAS product 5.7,
10.0, 12.1 and 15.0, and 46 against 56 at 256; Q5_0, whose fifth bits cost more to unpack: 6.9
against 8.4 ms at 16 rows, 11.3 against 10.7 at 32). The other types'
:func:`~.matmul.gemv_fused` costs about a pass over the weights per row, and types whose
unpacking costs more per value hand over sooner (Q6_K: 4.4 against 5.9 ms at 4 rows, 8.5 against 6.6 at 8)."""

_REGISTER_TYPES = frozenset((Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1))
"""The types :func:`~.matmul.gemv_registers` multiplies (all their row counts up to
:data:`GEMV_MAX_ROWS` but one row of Q4_0 and Q4_1, where unpacking nibbles is the cost and
:func:`~.matmul.gemv_nibbles` does it in fewer instructions: 0.41 against 0.86 ms; at one row
of Q5_0 it takes 0.77-0.92 ms against :func:`~.matmul.gemv_fused`'s 1.60)."""

_WIDTH = 32  # see blocks.decode_row: the block width, passed as a value on purpose


@dataclass(frozen=True, slots=True, eq=False)
class Weight:
    """One weight matrix of ``rows`` rows of ``cols`` values, in one GGUF type.

    Block types keep their blocks, laid out for what the weight is used for: row planes
    (:class:`~.blocks.Planes`) to look rows up (an embedding), tiles (:class:`~.tiles.Tiles`)
    to multiply (:meth:`for_products`). Float32 weights, and the types read as float32, are a
    dense ``(rows, cols)`` array for both.
    """

    qtype: Q
    rows: int
    cols: int
    planes: Planes | None = None
    tiles: Tiles | None = None
    dense: F32 | None = None
    packed: Packed | None = None

    @staticmethod
    def from_gguf(raw: NDArray[np.generic], qtype: Q, rows: int, cols: int) -> Weight:
        """A weight (row planes) from a GGUF tensor's data: ``rows`` rows of ``cols`` values
        of ``qtype``, a type in :data:`~.blocks.FORMATS` or F32.

        Raises:
            ValueError: the data does not hold that many values of that type.
        """
        if qtype == Q.F32:
            values = np.asarray(raw, dtype=np.float32)
            if values.size != rows * cols:
                raise ValueError(f"{values.size} float32 values are not {rows} x {cols}")
            return Weight.from_float(values.reshape(rows, cols))
        planes = pack(np.asarray(raw).view(np.uint8), qtype, rows, cols)
        return Weight(qtype, rows, cols, planes=planes)

    @staticmethod
    def from_float(values: F32) -> Weight:
        """A float32 weight (rows, cols), copied."""
        dense = np.array(values, dtype=np.float32, order="C")
        return Weight(Q.F32, dense.shape[0], dense.shape[1], dense=dense)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        held = (self.dense, self.planes, self.tiles, self.packed)
        return sum(a.nbytes for a in held if a is not None)

    def take(self, rows: I64) -> Weight:
        """The weight made of ``rows`` (of a weight in row planes or dense), in that order."""
        if self.dense is not None:
            return Weight.from_float(self.dense[rows])
        return Weight(self.qtype, len(rows), self.cols, planes=self._planes.take(rows))

    def for_products(self, int8: bool = False) -> Weight:
        """This weight laid out for :func:`linear` (tiles; a dense weight as it is); with
        ``int8``, a type of :data:`~.int8.TYPES` is laid out for products with int8
        activations (:mod:`.int8`) instead."""
        if self.dense is not None or self.tiles is not None or self.packed is not None:
            return self
        if int8 and self.qtype in INT8_TYPES:
            packed = Packed.from_planes(self._planes, self.qtype, self.rows, self.cols)
            return Weight(self.qtype, self.rows, self.cols, packed=packed)
        tiles = Tiles.from_planes(self._planes, self.qtype, self.rows, self.cols)
        return Weight(self.qtype, self.rows, self.cols, tiles=tiles)

    @staticmethod
    def concat(parts: Sequence[Weight], *, int8: bool = False) -> Linear:
        """A layer whose rows are those of ``parts`` one after another (weights in row planes
        or dense): parts of one type are merged into one product. ``int8``: as for
        :class:`Linear`."""
        merged: list[Weight] = []
        for part in parts:
            last = merged[-1] if merged else None
            if last is not None and last.qtype == part.qtype and last.cols == part.cols:
                merged[-1] = last._append(part)
            else:
                merged.append(part)
        return Linear(tuple(merged), int8=int8)

    def _append(self, other: Weight) -> Weight:
        rows = self.rows + other.rows
        if self.dense is not None and other.dense is not None:
            return Weight.from_float(np.concatenate([self.dense, other.dense]))
        planes = Planes.concat([self._planes, other._planes])
        return Weight(self.qtype, rows, self.cols, planes=planes)

    @property
    def _planes(self) -> Planes:
        if self.planes is None:
            raise ValueError("this weight is laid out for products only")
        return self.planes

    def __repr__(self) -> str:
        return f"Weight({self.qtype.name}, {self.rows}x{self.cols})"


@dataclass(frozen=True, slots=True, eq=False)
class Linear:
    """A linear layer's weight: the rows of ``parts`` one after another (one part unless
    fused matrices are of different types), each laid out for products; with ``int8``, the
    parts of :data:`~.int8.TYPES` multiply int8 activations (:mod:`.int8`: llama.cpp's
    arithmetic, not the exact values)."""

    parts: tuple[Weight, ...]
    int8: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(p.for_products(self.int8) for p in self.parts))

    @staticmethod
    def of(weight: Weight, *, int8: bool = False) -> Linear:
        """A layer of one weight (a copy laid out for products, when it is in row planes)."""
        return Linear((weight,), int8=int8)

    @property
    def rows(self) -> int:
        """Output features."""
        return sum(p.rows for p in self.parts)

    @property
    def cols(self) -> int:
        """Input features."""
        return self.parts[0].cols

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(p.nbytes for p in self.parts)


def linear(x: F32, w: Linear) -> F32:
    """``x @ W.T``: activations x (N, in) times the layer's weight (out, in), as (N, out)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], w.rows), np.float32)
    x8 = quantize(x) if any(p.packed is not None for p in w.parts) else None
    start = 0
    for part in w.parts:
        _product(x, x8, part, out[:, start : start + part.rows])
        start += part.rows
    return out


def attend_decode(q: F32, k_cache: F32, v_cache: F32, slots: I64, starts: I64, ends: I64) -> F32:
    """Attention of single-token items: item i's query heads ``q[i]`` (H, hd), already
    scaled, over positions ``starts[i]:ends[i]`` of slot ``slots[i]`` of a layer's caches
    (slots, KVH, positions, hd). Returns (items, H, hd)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty_like(q)
    _use_threads()
    decode_attention(q, k_cache, v_cache, slots, starts, ends, out)
    return out


def attend_prefill(
    q: F32, k_cache: F32, v_cache: F32, slot: int, start: int, window: int | None
) -> F32:
    """Causal attention of one prompt chunk: its queries ``q`` (T, H, hd), already scaled, at
    positions ``start``.. of slot ``slot`` of a layer's caches (slots, KVH, positions, hd),
    each over the positions up to its own (the last ``window`` of them, when given). Returns
    (T, H, hd)."""
    t, n_heads, hd = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    qg = np.ascontiguousarray(q.reshape(t, n_kv, group, hd).transpose(1, 0, 2, 3))  # (KVH,T,G,hd)
    out = np.empty_like(qg)
    _use_threads()
    prefill_attention(qg, k_cache, v_cache, slot, start, window or 0, _QUERY_BLOCK, out)
    return out.transpose(1, 0, 2, 3).reshape(t, n_heads, hd)


_QUERY_BLOCK = 64
"""Prompt tokens whose attention one thread computes together (with the query heads that
share a key/value head): enough rows for BLAS, and enough blocks that the causal triangle's
uneven blocks spread over the threads."""


def rotate_and_store(
    qk: F32,
    v: F32,
    rotation: NDArray[np.complex64],
    scale: float,
    k_cache: F32,
    v_cache: F32,
    slots: I64,
    positions: I64,
) -> F32:
    """RoPE on the new tokens' query and key heads ``qk`` (N, H + KVH, hd), times their
    factors ``rotation`` (N, hd/2) complex64 (pairs of dims as complex numbers); writes the
    keys and the values ``v`` (N, KVH, hd) at ``positions`` of ``slots`` of a layer's caches
    (slots, KVH, positions, hd), and returns the queries times ``scale``, (N, H, hd)."""
    n, n_heads = qk.shape[0], qk.shape[1] - v.shape[1]
    q = np.empty((n, n_heads, qk.shape[2]), np.float32)
    factors = np.ascontiguousarray(rotation).view(np.float32).reshape(n, -1)  # (N, hd)
    args = (np.ascontiguousarray(qk), np.ascontiguousarray(v), factors, scale)
    if n >= MANY_ROWS:
        _use_threads()
        rope_store_parallel(*args, k_cache, v_cache, slots, positions, q)
    else:
        rope_store(*args, k_cache, v_cache, slots, positions, q)
    return q


def rms_norm(x: F32, weight: F32, eps: float) -> F32:
    """RMSNorm of each row of ``x`` (N, D): ``x / sqrt(mean(x^2) + eps) * weight``, as a new
    array."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    if x.shape[0] >= MANY_ROWS:
        _use_threads()
        rms_parallel(x, weight, eps, out)
    else:
        rms_serial(x, weight, eps, out)
    return out


def gated_activation(gate_up: F32, gelu: bool) -> F32:
    """``act(gate) * up`` for each row of ``gate_up`` (N, 2F), gate its first F columns and up
    the rest: SiLU, ``g / (1 + e^-g)``, or with ``gelu`` GELU's tanh approximation,
    ``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``. Returns (N, F)."""
    gate_up = np.ascontiguousarray(gate_up, dtype=np.float32)
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
    kind = GELU_TANH if gelu else SILU
    _use_threads()
    gated(gate_up, kind, out)
    return out


def _use_threads() -> None:
    """Give the calling thread's kernels :data:`_threads` threads. numba's setting is per
    calling thread; it is remembered here because asking numba (``get_num_threads``, a lock
    and a check of its pool) cost ~5 us a call, 0.5 ms of a 1B model's decode step."""
    if getattr(_thread_state, "threads", 0) != _threads:
        numba.set_num_threads(_threads)
        _thread_state.threads = _threads


def _product(
    x: F32, x8: tuple[NDArray[np.int32], NDArray[np.int32], F32] | None, w: Weight, out: F32
) -> F32:
    if w.dense is not None:
        np.matmul(x, w.dense.T, out=out)
        return out
    _use_threads()
    if w.packed is not None:
        assert x8 is not None
        packed_product(*x8, w.packed, out)
        return out
    assert w.tiles is not None
    if x.shape[0] > GEMV_MAX_ROWS[w.qtype]:
        t = w.tiles
        gemm(t.code, t.block, *t.arrays, x, out)
    else:
        few_rows_product(x, w, out)
    return out


def few_rows_product(x: F32, w: Weight, out: F32) -> None:
    """``out`` (N, rows) = ``x`` (N, cols) float32 C-contiguous times the tiled weight ``w``
    transposed, by the matrix-vector kernel of its type and row count (what :func:`linear`
    runs up to :data:`GEMV_MAX_ROWS` rows)."""
    t = w.tiles
    assert t is not None
    if w.qtype in (Q.F16, Q.BF16):
        gemv(t.code, t.block, *t.arrays, x, out)
    elif x.shape[0] == 1 and w.qtype in (Q.Q4_0, Q.Q4_1):
        gemv_nibbles(t.code, t.qs, t.scale, t.offset, x, out, _WIDTH)
    elif w.qtype in _REGISTER_TYPES:
        gemv_registers(t.code, t.qs, t.qh, t.scale, t.offset, x, out)
    else:
        gemv_fused(t.code, *t.arrays, x, out, _WIDTH)


def embedding_rows(w: Weight, ids: I64) -> F32:
    """Rows ``ids`` of ``w`` as float32 (len(ids), cols): an embedding look-up."""
    if w.dense is not None:
        return w.dense[ids]
    out = np.empty((len(ids), w.cols), np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if w.packed is not None:  # a tied embedding, as the output head's int8 layout
        packed_rows(w.packed, ids, out)
        return out
    if w.tiles is not None:  # a tied embedding, held once, as the output head's tiles
        t = w.tiles
        tile_rows(t.code, t.block, *t.arrays, np.unique(ids // TILE), ids, out)
        return out
    p = w._planes
    decode_rows(FORMATS[w.qtype].code, p.qs, p.qh, p.scale, p.offset, p.sub, ids, out, _WIDTH)
    return out


def dequantize(w: Weight | Linear) -> F32:
    """The whole weight as float32 (rows, cols), whatever its layout."""
    if isinstance(w, Linear):
        return np.concatenate([dequantize(p) for p in w.parts])
    if w.tiles is None:  # planes, dense or packed: every row looked up
        return embedding_rows(w, np.arange(w.rows, dtype=np.int64))
    t = w.tiles  # every tile whole (embedding_rows would repeat them)
    out = np.empty((w.cols, t.scale.shape[0] * TILE), np.float32)
    decode_tiles(t.code, t.block, *t.arrays, out)
    return np.ascontiguousarray(out[:, : w.rows].T)


_thread_state = threading.local()  # .threads: what _use_threads set in this thread
_CORES: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
_threads = _CORES  # what set_threads asked for


def set_threads(n: int | None) -> None:
    """Run the kernels on ``n`` threads (None, or more than the cores: every core), e.g. in a
    process given fewer cores than the machine has. Applies to every thread that runs a
    product from now on.

    Raises:
        ValueError: ``n`` is below 1.
    """
    global _threads
    if n is not None and n < 1:
        raise ValueError(f"threads: must be at least 1, got {n}")
    _threads = min(n or _CORES, _CORES)
    _hold_scipy_blas_to_one_thread()


def _hold_scipy_blas_to_one_thread() -> None:
    """scipy's BLAS, which numba's ``np.dot`` calls inside the tiled product's threads, runs on
    one thread there (numpy's BLAS is another library and keeps its threads)."""
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library numba calls)

    marker = f"{os.sep}scipy.libs{os.sep}"
    for lib in ThreadpoolController().lib_controllers:
        if marker in lib.filepath:
            lib.set_num_threads(1)


def _quiet_numpy_blas() -> None:
    """numpy's OpenBLAS workers go to sleep at once after a call instead of spinning (see
    :mod:`zigllama_batch._blas_env`). When numpy was imported before this package, OpenBLAS
    has read its environment already: it is told to read it again and to restart its
    threads, which then take the new timeout. Skipped for an OpenBLAS without those entry
    points, and when the user set the variable."""
    if os.environ.get("OPENBLAS_THREAD_TIMEOUT") != _blas_env.THREAD_TIMEOUT:
        return
    for lib in ThreadpoolController().lib_controllers:
        if lib.internal_api != "openblas" or f"{os.sep}scipy.libs{os.sep}" in lib.filepath:
            continue
        try:
            openblas = ctypes.CDLL(lib.filepath)
            read_env, restart = openblas.openblas_read_env, openblas.blas_thread_shutdown_
        except (OSError, AttributeError):
            continue
        read_env()
        restart()


_hold_scipy_blas_to_one_thread()
_quiet_numpy_blas()
