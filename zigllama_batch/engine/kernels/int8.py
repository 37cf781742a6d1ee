"""Products with int8 activations: the arithmetic llama.cpp does, opt-in here.

The exact kernels (:mod:`.matmul`) multiply each weight, decoded to float32, by a float32
activation. Here, as in llama.cpp, each run of 32 activations is first rounded to int8 with
one float32 scale (ggml's Q8_0: ``d = max|x| / 127``, ``q = round(x / d)``), and a block's
sum is an integer dot product of bytes (:mod:`.dot8`), scaled once. The weights' values are
still exactly the file's; the activations carry a rounding error of up to ``d / 2`` each
(products about 0.5% off, relative to their largest): the price of 4 to 6 times fewer
instructions. :func:`available` says whether this CPU can run them.

The layout (:class:`Packed`): rows in groups of :data:`~.dot8.GROUP` (16), and within a
group and block the bytes in 64-byte chunks of 4 bytes of each row, the order ``vpdpbusd``
sums in: ``wq (groups, blocks, chunk bytes)``, with each block's scale (and Q4_1's minimum)
``(groups, blocks, 16)`` float32.

Left out: the other block types (Q5_0, Q5_1, Q5_K, Q6_K, F16, BF16), which keep the exact
kernels in this mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit, prange
from numpy.typing import NDArray

from .blocks import FORMATS, Q4_0, Q8_0, Planes
from .dot8 import GROUP, ISA, MAX_ROWS, Q8_BIAS, group_kernel
from .elementwise import MANY_ROWS

__all__ = ["TYPES", "Packed", "available", "packed_product", "packed_rows", "quantize"]

TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K})
"""The block types multiplied with int8 activations (Q4_K as Q4_1: see :meth:`Packed.from_planes`)."""

U8 = NDArray[np.uint8]
F32 = NDArray[np.float32]
I32 = NDArray[np.int32]


def available() -> bool:
    """Whether this CPU has the instructions the int8 products use (AVX2, or AVX-512 VNNI)."""
    return ISA is not None


@dataclass(frozen=True, slots=True)
class Packed:
    """A Q4_0, Q4_1, Q4_K or Q8_0 matrix in the interleaved layout (see the module docstring)."""

    wq: U8  # (groups, blocks, 256 or 512)
    scale: F32  # (groups, blocks, 16)
    offset: F32  # (groups, blocks, 16) for Q4_1, else (groups, blocks, 0)
    rows: int
    code: int

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.wq.nbytes + self.scale.nbytes + self.offset.nbytes

    @staticmethod
    def from_planes(planes: Planes, qtype: Q, rows: int, cols: int) -> Packed:
        """``rows`` x ``cols`` values of ``qtype`` (one of :data:`TYPES`), held as row planes,
        interleaved; the last group padded with zero rows.

        Q4_K is held as Q4_1 blocks of 32: each sub-block's scale ``d * sc`` and minimum
        ``-(dmin * m)`` as float32, computed as ``gguf`` computes them, so every value is still
        bit for bit gguf's; 24 bytes per 32 values against the file's 18 (the exact kernels'
        layout keeps the 6-bit sub-block scales).
        """
        if qtype == Q.Q4_K:
            planes, qtype = _k4_as_q4_1(planes, rows), Q.Q4_1
        n_blocks, groups = cols // 32, -(-rows // GROUP)
        width = planes.qs.shape[1] // n_blocks  # bytes a block: 16 (Q4) or 32 (Q8_0)
        qs = np.zeros((groups * GROUP, n_blocks, width), np.uint8)
        qs[:rows] = planes.qs.reshape(rows, n_blocks, width)
        if qtype == Q.Q8_0 and Q8_BIAS:
            qs[:rows] ^= 0x80  # q + 128, as unsigned
        # (groups, 16 rows, blocks, chunks, 4) -> (groups, blocks, chunks, 16 rows, 4)
        wq = qs.reshape(groups, GROUP, n_blocks, width // 4, 4).transpose(0, 2, 3, 1, 4)

        def per_group(a: F32) -> F32:
            if not a.size:
                return np.zeros((groups, n_blocks, 0), np.float32)
            full = np.zeros((groups * GROUP, n_blocks), np.float32)
            full[:rows] = a
            return np.ascontiguousarray(full.reshape(groups, GROUP, n_blocks).transpose(0, 2, 1))

        return Packed(
            wq=np.ascontiguousarray(wq).reshape(groups, n_blocks, width * GROUP),
            scale=per_group(planes.scale),
            offset=per_group(planes.offset),
            rows=rows,
            code=FORMATS[qtype].code,
        )


def _k4_as_q4_1(planes: Planes, rows: int) -> Planes:
    """Q4_K planes as the Q4_1 planes of the same values (see :meth:`Packed.from_planes`)."""
    n_super = planes.scale.shape[1]
    # Each 64 values of a super-block: 32 bytes, the first 32 values in their low nibbles.
    nib = planes.qs.reshape(rows, n_super, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
    values = (nib & 15).reshape(rows, n_super * 8, 32)  # (rows, sub-blocks, 32)
    qs = (values[..., :16] | (values[..., 16:] << 4)).astype(np.uint8)  # byte j: values j, j + 16
    sub = planes.sub.reshape(rows, n_super, 2, 8).astype(np.float32)  # scales, then minimums
    scale = planes.scale[:, :, None] * sub[:, :, 0]
    offset = -(planes.offset[:, :, None] * sub[:, :, 1])
    empty = np.zeros((rows, 0), np.uint8)
    return Planes(
        qs.reshape(rows, -1), empty, scale.reshape(rows, -1), offset.reshape(rows, -1), empty
    )


def quantize(x: F32) -> tuple[I32, I32, F32]:
    """Activations ``x`` (N, K) as int8, 32 to a block: their bytes four to an int32
    (N, K / 4), each block's sum of them (N, K / 32) and its scale (N, K / 32)."""
    n, k = x.shape
    q = np.empty((n, k), np.int8)
    sums = np.empty((n, k // 32), np.int32)
    scales = np.empty((n, k // 32), np.float32)
    if n >= MANY_ROWS:  # a pass over each row, like RMSNorm: threads pay from as many rows
        _quantize_parallel(x, q, sums, scales)
    else:
        _quantize(x, q, sums, scales)
    return q.view(np.int32), sums, scales


@njit(cache=True, fastmath=True)
def _quantize_row(x: np.ndarray, q: np.ndarray, sums: np.ndarray, scales: np.ndarray) -> None:
    for b in range(sums.shape[0]):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[b * 32 + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        total = np.int32(0)
        for j in range(32):
            v = np.int32(np.rint(x[b * 32 + j] * inv))
            q[b * 32 + j] = v
            total += v
        sums[b] = total
        scales[b] = d


@njit(cache=True)
def _quantize(x: np.ndarray, q: np.ndarray, sums: np.ndarray, scales: np.ndarray) -> None:
    for r in range(x.shape[0]):
        _quantize_row(x[r], q[r], sums[r], scales[r])


@njit(parallel=True, cache=True)
def _quantize_parallel(x: np.ndarray, q: np.ndarray, sums: np.ndarray, scales: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        _quantize_row(x[r], q[r], sums[r], scales[r])


_GROUP_1, _GROUP_2, _GROUP_4 = (group_kernel(rows) for rows in (1, 2, 4))


@njit(cache=True)
def _group(code, wq, scale, offset, x4, sums, dx, tile, g, r0, rows):  # type: ignore[no-untyped-def]
    """Rows r0..r0 + rows (1, 2 or 4) of group g into tile."""
    if rows == 4:
        _GROUP_4(code, wq, scale, offset, x4, sums, dx, tile, g, r0)
    elif rows == 2:
        _GROUP_2(code, wq, scale, offset, x4, sums, dx, tile, g, r0)
    else:
        _GROUP_1(code, wq, scale, offset, x4, sums, dx, tile, g, r0)


@njit(parallel=True, cache=True)
def _product(code, wq, scale, offset, x4, sums, dx, out, row_block):  # type: ignore[no-untyped-def]
    """out (N, rows) = x (N, K) times the packed weight; threads over (block of
    row_block activation rows, group), the group fastest, so a thread's activation rows
    stay in its cache."""
    groups, n, n_out = wq.shape[0], x4.shape[0], out.shape[1]
    n_row_blocks = -(-n // row_block)
    for task in prange(n_row_blocks * groups):
        rb, g = task // groups, task % groups
        tile = np.empty((MAX_ROWS, GROUP), np.float32)
        first, last = rb * row_block, min(n, rb * row_block + row_block)
        lanes = min(GROUP, n_out - g * GROUP)
        r = first
        while r < last:
            rows = min(MAX_ROWS, last - r)
            if rows == 3:
                rows = 2
            _group(code, wq, scale, offset, x4, sums, dx, tile, g, r, rows)
            for i in range(rows):
                for o in range(lanes):
                    out[r + i, g * GROUP + o] = tile[i, o]
            r += rows


_ROW_BLOCK = 64
"""Activation rows a thread multiplies by one group before moving to the next: 64 rows of a
8192-wide layer are 512 KiB of int8, within a Zen 4 core's 1 MiB L2."""


def packed_product(x4: I32, sums: I32, dx: F32, w: Packed, out: F32) -> None:
    """``out`` (N, rows) = the activations :func:`quantize` gave times ``w``, transposed."""
    _product(w.code, w.wq, w.scale, w.offset, x4, sums, dx, out, _ROW_BLOCK)


@njit(cache=True)
def _rows(code, bias, wq, scale, offset, ids, out):  # type: ignore[no-untyped-def]
    n_blocks, chunk = wq.shape[1], wq.shape[2] // GROUP  # chunk: bytes of a row per block
    for i in range(ids.shape[0]):
        g, lane = ids[i] // GROUP, ids[i] % GROUP
        for b in range(n_blocks):
            d = scale[g, b, lane]
            for j in range(chunk):  # byte j of the row's block
                at = (j // 4) * GROUP * 4 + lane * 4 + j % 4
                byte = wq[g, b, at]
                if code == Q8_0:  # stored q + bias (0 or 128) as a byte
                    out[i, b * 32 + j] = d * np.float32(np.int8(np.uint8(byte ^ bias)))
                else:
                    lo, hi = np.float32(byte & 15), np.float32(byte >> 4)
                    if code == Q4_0:
                        out[i, b * 32 + j] = d * (lo - np.float32(8.0))
                        out[i, b * 32 + 16 + j] = d * (hi - np.float32(8.0))
                    else:
                        m = offset[g, b, lane]
                        out[i, b * 32 + j] = d * lo + m
                        out[i, b * 32 + 16 + j] = d * hi + m


def packed_rows(w: Packed, ids: NDArray[np.int64], out: F32) -> None:
    """Rows ``ids`` of ``w`` as float32 into ``out`` (len(ids), cols): the values ``gguf``'s
    ``dequantize`` gives."""
    _rows(w.code, Q8_BIAS, w.wq, w.scale, w.offset, ids, out)
