"""numba kernels: products of activation rows with tiled quantized weights, and decoding.

A weight for products is :class:`~.tiles.Tiles`; every kernel decodes one input column of a
tile at a time with :func:`~.tiles.decode_column` (the float32 values the ``gguf`` package
gives) into a :data:`~.tiles.TILE`-float vector that stays in L1, and differs in what it does
next. Threads take whole tiles (``prange``), so each reads one contiguous run of memory.

- :func:`gemv` (a few activation rows): each decoded column is multiplied into every row's
  accumulators. The weight bytes are read once; at one row, reading them is the whole cost.
- :func:`gemm` (many rows): a tile is decoded whole into float32 (``in`` x TILE: 1 MiB for a
  2048-wide matrix, in L2) and multiplied with all activation rows in one BLAS call (scipy's
  BLAS, one thread inside each of numba's): BLAS's arithmetic speed, the weights still read as
  blocks.
- :func:`decode_tiles`: the whole weight as float32 (tests, float32 fallbacks).
- :func:`decode_rows` and :func:`tile_rows`: chosen rows as float32 (embedding look-ups), from
  row planes or from tiles (a tied embedding, which the output head multiplies as tiles).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q8_0, decode_row
from .bytes8 import field, join, nibble
from .dotf import MAX_ROWS, chunk_kernel
from .tiles import TILE, decode_column

__all__ = [
    "decode_rows",
    "decode_tiles",
    "gemm",
    "gemv",
    "gemv_fused",
    "gemv_nibbles",
    "gemv_registers",
    "tile_rows",
]


@njit(parallel=True, fastmath=True, cache=True)
def gemv(
    code: int,
    block: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    x: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out[n, o] = sum_i x[n, i] * W[o, i]`` for the tiled weight whose planes are given, of
    the type numbered ``code`` with ``block`` values a block; x: (N, in) float32 C-contiguous;
    out: (N, out) float32, any strides."""
    n_tiles, n_blocks, tile = scale.shape
    n_rows, n_out = x.shape[0], out.shape[1]
    for t in prange(n_tiles):
        acc = np.zeros((n_rows, tile), np.float32)
        column = np.empty((1, tile), np.float32)
        for b in range(n_blocks):
            for j in range(block):
                decode_column(code, qs, qh, scale, offset, sub, t, b, j, column, 0)
                k = b * block + j
                for n in range(n_rows):
                    xv = x[n, k]
                    for o in range(tile):
                        acc[n, o] += column[0, o] * xv
        first = t * tile
        last = min(n_out, first + tile)
        for n in range(n_rows):
            out[n, first:last] = acc[n, : last - first]


_K1, _K2, _K3 = (chunk_kernel(rows) for rows in (1, 2, 3))


@njit(cache=True)
def _pass(code, qs, qh, scale, offset, x, sums, part, t, r0, rows):  # type: ignore[no-untyped-def]
    """Rows r0..r0 + rows (1 to 3) times tile t's output rows, into part (3, TILE)."""
    if rows == 3:
        _K3(code, qs, qh, scale, offset, x, sums, part, t, r0)
    elif rows == 2:
        _K2(code, qs, qh, scale, offset, x, sums, part, t, r0)
    else:
        _K1(code, qs, qh, scale, offset, x, sums, part, t, r0)


@njit(parallel=True, cache=True)
def gemv_registers(
    code: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    x: np.ndarray,
    out: np.ndarray,
) -> None:
    """:func:`gemv_fused` for Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 weights, with the partial sums
    in registers (:mod:`.dotf`). Threads take tiles; each multiplies its tile by up to three
    activation rows a pass (a tile of 2048-wide Q4_0 is 128 KiB: passes after the first read
    it from L2)."""
    n_tiles, n_blocks, tile = qs.shape[0], qs.shape[1], qs.shape[3]
    n_rows, n_out = x.shape[0], out.shape[1]
    sums = np.zeros((n_rows, n_blocks), np.float32)  # each block's sum of x
    for n in range(n_rows):
        for b in range(n_blocks):
            for j in range(32):
                sums[n, b] += x[n, b * 32 + j]
    # As few passes as three rows a pass allow, their rows as even as can be: a pass costs
    # about the same at one row as at three (its weights are decoded either way).
    passes = -(-n_rows // MAX_ROWS)
    for t in prange(n_tiles):
        part = np.empty((MAX_ROWS, tile), np.float32)
        first = t * tile
        lanes = min(tile, n_out - first)
        r = 0
        for g in range(passes):
            rows = n_rows // passes + (1 if g < n_rows % passes else 0)
            _pass(code, qs, qh, scale, offset, x, sums, part, t, r, rows)
            for i in range(rows):
                for o in range(lanes):
                    out[r + i, first + o] = part[i, o]
            r += rows


@njit(parallel=True, cache=True)
def gemm(
    code: int,
    block: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    x: np.ndarray,
    out: np.ndarray,
) -> None:
    """As :func:`gemv`, a whole tile decoded then multiplied by BLAS: for many rows."""
    n_tiles, tile = scale.shape[0], scale.shape[2]
    n_rows, n_in, n_out = x.shape[0], x.shape[1], out.shape[1]
    for t in prange(n_tiles):
        weights = np.empty((n_in, tile), np.float32)  # (in, TILE)
        _decode_tile(code, block, qs, qh, scale, offset, sub, t, weights)
        product = np.dot(x, weights)  # (N, TILE)
        first = t * tile
        last = min(n_out, first + tile)
        for n in range(n_rows):
            out[n, first:last] = product[n, : last - first]


@njit(inline="always", cache=True)
def _decode_tile(
    code: int,
    block: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    t: int,
    out: np.ndarray,
) -> None:
    """Tile ``t`` as float32 into ``out`` (in, TILE): each input column of its rows."""
    for b in range(scale.shape[1]):
        for j in range(block):
            decode_column(code, qs, qh, scale, offset, sub, t, b, j, out, b * block + j)


@njit(parallel=True, cache=True)
def decode_tiles(
    code: int,
    block: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    out: np.ndarray,
) -> None:
    """The tiled weight as float32 into ``out`` (in, tiles * TILE): its rows as columns."""
    n_tiles, tile = scale.shape[0], scale.shape[2]
    for t in prange(n_tiles):
        _decode_tile(code, block, qs, qh, scale, offset, sub, t, out[:, t * tile : (t + 1) * tile])


@njit(cache=True)
def decode_rows(
    code: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    ids: np.ndarray,
    out: np.ndarray,
    width: int,
) -> None:
    """Rows ``ids`` of row-major planes as float32 into ``out`` (len(ids), in)."""
    for r in range(ids.shape[0]):
        o = ids[r]
        decode_row(code, qs[o], qh[o], scale[o], offset[o], sub[o], out[r], width)


@njit(parallel=True, fastmath=True, cache=True)
def gemv_fused(
    code: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    x: np.ndarray,
    out: np.ndarray,
    width: int,
) -> None:
    """:func:`gemv` for the block types, with the scales factored out of each block's sum:
    ``sum_j (d q_j + m) x_j = d sum_j q_j x_j + m sum_j x_j``, so the inner loop is one
    integer-to-float conversion and one multiply-add a value. (The products differ from
    :func:`gemv`'s in rounding only.) ``width`` must be 32; see :mod:`.blocks` for why it is
    an argument."""
    n_tiles, n_blocks, tile = scale.shape
    n_rows, n_out = x.shape[0], out.shape[1]
    half = width // 2
    # Sums of x over every run of 16 inputs: the minimums' and the offsets' share.
    sums = np.zeros((n_rows, x.shape[1] // half), np.float32)
    for n in range(n_rows):
        for g in range(sums.shape[1]):
            for j in range(half):
                sums[n, g] += x[n, g * half + j]
    for t in prange(n_tiles):
        acc = np.zeros((n_rows, tile), np.float32)
        part = np.empty((n_rows, tile), np.float32)
        if code in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1):
            for b in range(n_blocks):
                part[:] = 0.0
                k = b * width
                # Four inputs a pass: the partial sums are loaded and stored once for four
                # products (benchmarks/kernels.py, Q8_0, one row: 17 -> 28 Gvalues/s).
                if code == Q8_0:
                    for j in range(0, width, 4):
                        for n in range(n_rows):
                            x0, x1 = x[n, k + j], x[n, k + j + 1]
                            x2, x3 = x[n, k + j + 2], x[n, k + j + 3]
                            for o in range(tile):
                                v0 = np.float32(np.int8(qs[t, b, j, o]))
                                v1 = np.float32(np.int8(qs[t, b, j + 1, o]))
                                v2 = np.float32(np.int8(qs[t, b, j + 2, o]))
                                v3 = np.float32(np.int8(qs[t, b, j + 3, o]))
                                part[n, o] += (v0 * x0 + v1 * x1) + (v2 * x2 + v3 * x3)
                elif code in (Q4_0, Q4_1):  # rows two at a time: one unpacking serves both
                    for j in range(half):
                        for n in range(0, n_rows - 1, 2):
                            xa0, xa1 = x[n, k + j], x[n, k + half + j]
                            xb0, xb1 = x[n + 1, k + j], x[n + 1, k + half + j]
                            for o in range(tile):
                                q = qs[t, b, j, o]
                                lo = np.float32(nibble(q, 0))
                                hi = np.float32(nibble(q, 4))
                                part[n, o] += lo * xa0 + hi * xa1
                                part[n + 1, o] += lo * xb0 + hi * xb1
                        if n_rows % 2:
                            n = n_rows - 1
                            x0, x1 = x[n, k + j], x[n, k + half + j]
                            for o in range(tile):
                                q = qs[t, b, j, o]
                                lo, hi = nibble(q, 0), nibble(q, 4)
                                part[n, o] += np.float32(lo) * x0 + np.float32(hi) * x1
                else:
                    for j in range(half):
                        lo_byte, lo_bit = j >> 3, j & 7
                        hi_byte, hi_bit = (j + half) >> 3, (j + half) & 7
                        for n in range(n_rows):
                            x0, x1 = x[n, k + j], x[n, k + half + j]
                            for o in range(tile):
                                q = qs[t, b, j, o]
                                q0 = join(
                                    field(q, 0, 15), field(qh[t, b, lo_byte, o], lo_bit, 1), 4
                                )
                                q1 = join(
                                    field(q, 4, 15), field(qh[t, b, hi_byte, o], hi_bit, 1), 4
                                )
                                part[n, o] += np.float32(q0) * x0 + np.float32(q1) * x1
                for n in range(n_rows):
                    total = sums[n, 2 * b] + sums[n, 2 * b + 1]
                    if code == Q8_0:
                        for o in range(tile):
                            acc[n, o] += scale[t, b, o] * part[n, o]
                    elif code in (Q4_0, Q5_0):
                        bias = total * np.float32(8 if code == Q4_0 else 16)
                        for o in range(tile):
                            acc[n, o] += scale[t, b, o] * (part[n, o] - bias)
                    else:
                        for o in range(tile):
                            acc[n, o] += scale[t, b, o] * part[n, o] + offset[t, b, o] * total
        elif code in (Q4_K, Q5_K):
            for b in range(n_blocks):
                for s in range(8):  # sub-blocks of 32: low nibbles of 32 bytes, then high ones
                    part[:] = 0.0
                    k, row, shift = b * 256 + s * width, (s // 2) * width, 4 * (s % 2)
                    for i in range(width):
                        for n in range(n_rows):
                            xv = x[n, k + i]
                            if code == Q4_K:
                                for o in range(tile):
                                    q = field(qs[t, b, row + i, o], shift, 15)
                                    part[n, o] += np.float32(q) * xv
                            else:
                                for o in range(tile):
                                    low = field(qs[t, b, row + i, o], shift, 15)
                                    q = join(low, field(qh[t, b, i, o], s, 1), 4)
                                    part[n, o] += np.float32(q) * xv
                    for n in range(n_rows):
                        total = sums[n, (k // half)] + sums[n, (k // half) + 1]
                        for o in range(tile):
                            sc = scale[t, b, o] * np.float32(sub[t, b, s, o])
                            low = offset[t, b, o] * np.float32(sub[t, b, 8 + s, o])
                            acc[n, o] += sc * part[n, o] - low * total
        else:  # Q6_K: 16 groups of 16 values, a signed scale each, q - 32
            for b in range(n_blocks):
                for g in range(16):
                    part[:] = 0.0
                    j0 = g * half
                    kk, r0 = j0 // 128, j0 % 128
                    lo_shift, hi_shift = 4 * (r0 // 64), 2 * (r0 // 32)
                    low_row, high_row = kk * 64 + r0 % 64, kk * 32 + r0 % 32
                    for i in range(half):
                        for n in range(n_rows):
                            xv = x[n, b * 256 + j0 + i]
                            for o in range(tile):
                                low = field(qs[t, b, low_row + i, o], lo_shift, 15)
                                q = join(low, field(qh[t, b, high_row + i, o], hi_shift, 3), 4)
                                part[n, o] += np.float32(q) * xv
                    for n in range(n_rows):
                        bias = sums[n, (b * 256 + j0) // half] * np.float32(32)
                        for o in range(tile):
                            sc = scale[t, b, o] * np.float32(np.int8(sub[t, b, g, o]))
                            acc[n, o] += sc * (part[n, o] - bias)
        first = t * tile
        last = min(n_out, first + tile)
        for n in range(n_rows):
            for o in range(last - first):
                out[n, first + o] = acc[n, o]


@njit(parallel=True, fastmath=True, cache=True)
def gemv_nibbles(
    code: int,
    qs: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    x: np.ndarray,
    out: np.ndarray,
    width: int,
) -> None:
    """:func:`gemv_fused` for one activation row and a Q4_0 or Q4_1 weight (one stream's
    decode): the same sums, with the partial sums a one-dimensional array of :data:`TILE`
    values made afresh for each block. The row loop and two-dimensional indexing of the
    general kernel cost a fifth of its time here (``benchmarks/kernels.py``, an 8192 x 2048
    Q4_0 matrix, one row: 0.77 against 0.65 ms on one thread, AMD EPYC Zen 4)."""
    n_tiles, n_blocks = scale.shape[0], scale.shape[1]
    n_out, half = out.shape[1], width // 2
    sums = np.zeros(n_blocks, np.float32)  # each block's sum of x: the offsets' share
    for b in range(n_blocks):
        for j in range(width):
            sums[b] += x[0, b * width + j]
    for t in prange(n_tiles):
        acc = np.zeros(TILE, np.float32)
        for b in range(n_blocks):
            part = np.zeros(TILE, np.float32)
            k = b * width
            for j in range(half):  # byte j: value j in its low nibble, value j + 16 in its high
                x0, x1 = x[0, k + j], x[0, k + half + j]
                for o in range(TILE):
                    q = qs[t, b, j, o]
                    part[o] += np.float32(nibble(q, 0)) * x0 + np.float32(nibble(q, 4)) * x1
            if code == Q4_0:
                bias = sums[b] * np.float32(8)
                for o in range(TILE):
                    acc[o] += scale[t, b, o] * (part[o] - bias)
            else:
                for o in range(TILE):
                    acc[o] += scale[t, b, o] * part[o] + offset[t, b, o] * sums[b]
        first = t * TILE
        for o in range(min(TILE, n_out - first)):
            out[0, first + o] = acc[o]


@njit(parallel=True, cache=True)
def tile_rows(
    code: int,
    block: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    tiles: np.ndarray,
    ids: np.ndarray,
    out: np.ndarray,
) -> None:
    """Rows ``ids`` of a tiled weight as float32 into ``out`` (len(ids), in). ``tiles``: the
    distinct tiles the ids fall in; each is decoded once, whole (``in`` x TILE values: 50 us
    for a 2048-wide Q8_0 tile), for all the ids it holds."""
    n_blocks, tile = scale.shape[1], scale.shape[2]
    for u in prange(tiles.shape[0]):
        t = tiles[u]
        values = np.empty((block * n_blocks, tile), np.float32)  # (in, TILE)
        _decode_tile(code, block, qs, qh, scale, offset, sub, t, values)
        for r in range(ids.shape[0]):
            if ids[r] // tile == t:
                out[r] = values[:, ids[r] % tile]
