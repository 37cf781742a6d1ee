"""Weights laid out for products: tiles of output rows, each tile's values column by column.

A matrix-vector product over row-major blocks reads each row's blocks one after another, and
numba's loops over one block (16 or 32 values) are too short for LLVM to vectorise well. Here a
matrix of ``rows`` rows is cut into tiles of :data:`TILE` rows (the last one padded with zero
rows), and within a tile every field of the row planes (:mod:`.blocks`) is stored with the
tile's rows innermost: ``qs`` becomes ``(tiles, blocks, bytes per block, TILE)``, ``scale``
``(tiles, blocks, TILE)``. Decoding one input column of a tile is then one loop over
:data:`TILE` contiguous values, and a thread's tile is one contiguous run of memory.

:func:`decode_column` turns column ``j`` of block ``b`` of a tile into the :data:`TILE`
float32 values the ``gguf`` package's ``dequantize`` gives for it, bit for bit, like
:func:`.blocks.decode_row`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit
from numpy.typing import NDArray

from .blocks import (
    BF16,
    F16,
    FORMATS,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    Planes,
    bf16_pairs,
    f16_pairs,
)
from .bytes8 import field, join

__all__ = ["TILE", "Tiles", "decode_column"]

U8 = NDArray[np.uint8]

TILE = 128
"""Output rows per tile: 8 vectors of 16 float32 per column, and a Q8_0 tile of a 2048-wide
matrix is 256 KiB, a quarter of a Zen 4 core's L2. (64 rows ran at half the speed, 256 rows at
the same speed, in a single-thread matrix-vector product over a 8192 x 2048 Q8_0 matrix.)"""


@dataclass(frozen=True, slots=True)
class Tiles:
    """A matrix's planes as tiles of :data:`TILE` rows (see the module docstring)."""

    qs: NDArray[np.uint8]  # (tiles, blocks, bytes, TILE); F16/BF16: (tiles, blocks, 32, 2 TILE)
    qh: NDArray[np.uint8]  # (tiles, blocks, bytes, TILE)
    scale: NDArray[np.float32]  # (tiles, blocks, TILE)
    offset: NDArray[np.float32]  # (tiles, blocks, TILE), or (tiles, blocks, 0) if absent
    sub: NDArray[np.uint8]  # (tiles, blocks, 16, TILE)
    rows: int
    """Rows of the matrix (the last tile holds fewer real ones when it does not divide)."""
    code: int
    """The type's number in the decoders (:data:`~.blocks.FORMATS`)."""
    block: int
    """Values a block holds in this layout (32 for F16 and BF16, which have no blocks)."""

    @property
    def arrays(self) -> tuple[U8, U8, NDArray[np.float32], NDArray[np.float32], U8]:
        """The planes, in the order the kernels take them: qs, qh, scale, offset, sub."""
        return (self.qs, self.qh, self.scale, self.offset, self.sub)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(a.nbytes for a in self.arrays)

    @staticmethod
    def from_planes(planes: Planes, qtype: Q, rows: int, cols: int) -> Tiles:
        """``rows`` x ``cols`` values of type ``qtype`` held as row planes, as tiles."""
        fmt = FORMATS[qtype]
        block = max(fmt.block_size, 32)  # F16/BF16: 32 values a "block" here
        n_blocks = cols // block
        padded = -(-rows // TILE) * TILE
        shape = (padded // TILE, n_blocks)
        if qtype in (Q.F16, Q.BF16):  # a value's two bytes stay side by side
            pairs = _tiled(planes.qs, rows, n_blocks, 32, 2)  # (tiles, blocks, 32, TILE, 2)
            qs = pairs.reshape(*shape, 32, 2 * TILE)
        else:
            qs = _tiled(planes.qs, rows, n_blocks, planes.qs.shape[1] // n_blocks)
        qh, sub = (
            _tiled(p, rows, n_blocks, p.shape[1] // n_blocks)
            if p.size
            else np.zeros((*shape, 0, TILE), np.uint8)
            for p in (planes.qh, planes.sub)
        )
        scale = (  # F16/BF16 have none: zeros the kernels read only for the tiles' shape
            _tiled(planes.scale, rows, n_blocks, 1).reshape(*shape, TILE)
            if planes.scale.size
            else np.zeros((*shape, TILE), np.float32)
        )
        offset = (  # (tiles, blocks, 0) for a type without minimums
            _tiled(planes.offset, rows, n_blocks, 1).reshape(*shape, TILE)
            if planes.offset.size
            else np.zeros((*shape, 0), np.float32)
        )
        return Tiles(
            qs=qs, qh=qh, scale=scale, offset=offset, sub=sub, rows=rows, code=fmt.code, block=block
        )


def _tiled(a: NDArray[Any], rows: int, n_blocks: int, width: int, pair: int = 0) -> NDArray[Any]:
    """A row plane (rows, n_blocks * width [* pair]) as (tiles, n_blocks, width, TILE [, pair]),
    zero rows padding the last tile."""
    padded = -(-rows // TILE) * TILE
    inner = (width, pair) if pair else (width,)
    full = np.zeros((padded, n_blocks, *inner), a.dtype)
    full[:rows] = a.reshape(rows, n_blocks, *inner)
    split = full.reshape(padded // TILE, TILE, n_blocks, *inner)
    order = (0, 2, 3, 1, 4) if pair else (0, 2, 3, 1)
    return np.ascontiguousarray(split.transpose(order))


@njit(inline="always", cache=True)
def decode_column(
    code: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    t: int,
    b: int,
    j: int,
    out: np.ndarray,
    at: int,
) -> None:
    """Value ``j`` of block ``b`` of every row of tile ``t`` as float32 into ``out[at]``
    (TILE values), in ``gguf.quants``' arithmetic and order. Indexes the planes directly:
    a view per call would cost numba a reference count update each."""
    n = scale.shape[2]
    if code == Q8_0:
        for o in range(n):
            out[at, o] = np.float32(np.int8(qs[t, b, j, o])) * scale[t, b, o]
    elif code in (Q4_0, Q4_1, Q5_0, Q5_1):
        i, shift = j % 16, 4 * (j // 16)
        if code == Q4_0:
            for o in range(n):
                q = np.float32(field(qs[t, b, i, o], shift, 15))
                out[at, o] = scale[t, b, o] * (q - np.float32(8))
        elif code == Q4_1:
            for o in range(n):
                q = field(qs[t, b, i, o], shift, 15)
                out[at, o] = scale[t, b, o] * np.float32(q) + offset[t, b, o]
        else:
            byte, bit = j >> 3, j & 7
            for o in range(n):
                q = np.float32(
                    join(field(qs[t, b, i, o], shift, 15), field(qh[t, b, byte, o], bit, 1), 4)
                )
                if code == Q5_0:
                    out[at, o] = scale[t, b, o] * (q - np.float32(16))
                else:
                    out[at, o] = scale[t, b, o] * q + offset[t, b, o]
    elif code in (Q4_K, Q5_K):
        s, i = j // 32, j % 32
        row, shift = (s // 2) * 32 + i, 4 * (s % 2)
        for o in range(n):
            q = field(qs[t, b, row, o], shift, 15)
            if code == Q5_K:
                q = join(q, field(qh[t, b, i, o], s, 1), 4)
            sc = scale[t, b, o] * np.float32(sub[t, b, s, o])
            out[at, o] = sc * np.float32(q) - offset[t, b, o] * np.float32(sub[t, b, 8 + s, o])
    elif code == Q6_K:
        k, r = j // 128, j % 128
        low_row, high_row = k * 64 + r % 64, k * 32 + r % 32
        lo_shift, hi_shift, g = 4 * (r // 64), 2 * (r // 32), j // 16
        for o in range(n):
            low = field(qs[t, b, low_row, o], lo_shift, 15)
            q = np.float32(join(low, field(qh[t, b, high_row, o], hi_shift, 3), 4))
            sc = scale[t, b, o] * np.float32(np.int8(sub[t, b, g, o]))
            out[at, o] = sc * (q - np.float32(32))
    elif code == BF16:
        bf16_pairs(qs[t, b, j], out[at])
    elif code == F16:
        f16_pairs(qs[t, b, j], out[at])
