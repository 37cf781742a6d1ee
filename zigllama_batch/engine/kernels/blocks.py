"""GGUF block formats, split into planes at load and decoded a row at a time in numba to exactly
the float32 values the ``gguf`` package's ``dequantize`` gives.

A GGUF row interleaves each block's scale with its quants. :func:`pack` splits a tensor into
planes, one array per kind of field, so the decoders read each field as one run: ``qs`` (the
packed low bits, in the file's order within a block), ``qh`` (high bits: Q5_0, Q5_1, Q5_K,
Q6_K), ``scale`` (each block's or super-block's float32 scale), ``offset`` (its minimum: Q4_1,
Q5_1; the super-block's ``dmin``: Q4_K, Q5_K) and ``sub`` (the K-quants' per-sub-block 6-bit
scales and minimums, or Q6_K's signed 8-bit scales). The float16 fields become float32 once, so
a row holds at most a few percent more bytes than the file (Q4_0: 20 bytes a block against
18). F16 and BF16 rows keep their two bytes a value in ``qs``.

:func:`decode_row` repeats ``gguf.quants``' arithmetic in its order (``d * q + m``, never a
fused multiply-add), so every decoded value is bit for bit the one ``gguf`` gives; the tests
check that per type. Its inner loops take the block width as an argument (``width``, always 32)
rather than a constant: LLVM fully unrolls a 32-trip loop and then fails to vectorise it,
while a loop of unknown length is vectorised (measured: 2.3 against 10 billion Q8_0 values a
second on one core).

Left out: Q2_K, Q3_K, the IQ types and the ternary ones, which the loader takes as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit
from numpy.typing import NDArray

__all__ = ["FORMATS", "BlockFormat", "Planes", "bf16_pairs", "decode_row", "f16_pairs", "pack"]

U8 = NDArray[np.uint8]
F32 = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class BlockFormat:
    """How one GGUF type packs a row: ``block_size`` values in ``block_bytes`` bytes."""

    code: int
    """The type's number in :func:`decode_row` (not ggml's enum value)."""
    block_size: int
    block_bytes: int


F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = range(10)

FORMATS: dict[Q, BlockFormat] = {
    Q.F16: BlockFormat(F16, 1, 2),
    Q.BF16: BlockFormat(BF16, 1, 2),
    Q.Q4_0: BlockFormat(Q4_0, 32, 18),
    Q.Q4_1: BlockFormat(Q4_1, 32, 20),
    Q.Q5_0: BlockFormat(Q5_0, 32, 22),
    Q.Q5_1: BlockFormat(Q5_1, 32, 24),
    Q.Q8_0: BlockFormat(Q8_0, 32, 34),
    Q.Q4_K: BlockFormat(Q4_K, 256, 144),
    Q.Q5_K: BlockFormat(Q5_K, 256, 176),
    Q.Q6_K: BlockFormat(Q6_K, 256, 210),
}
"""The types kept in their blocks, by GGUF type."""


@dataclass(frozen=True, slots=True)
class Planes:
    """One weight matrix's fields, each ``(rows, n)``; a field the type lacks is ``(rows, 0)``."""

    qs: U8
    qh: U8
    scale: F32
    offset: F32
    sub: U8

    @property
    def nbytes(self) -> int:
        """Bytes held by the planes."""
        return sum(a.nbytes for a in (self.qs, self.qh, self.scale, self.offset, self.sub))

    def take(self, rows: NDArray[np.int64]) -> Planes:
        """The planes of ``rows``, in that order."""
        return Planes(
            self.qs[rows], self.qh[rows], self.scale[rows], self.offset[rows], self.sub[rows]
        )

    @staticmethod
    def concat(parts: list[Planes]) -> Planes:
        """The rows of ``parts`` one after another (parts of one type)."""
        return Planes(
            np.concatenate([p.qs for p in parts]),
            np.concatenate([p.qh for p in parts]),
            np.concatenate([p.scale for p in parts]),
            np.concatenate([p.offset for p in parts]),
            np.concatenate([p.sub for p in parts]),
        )


def _f16(fields: U8) -> F32:
    """Little-endian float16 fields, (..., 2) bytes, as float32 (..., )."""
    return np.ascontiguousarray(fields).view(np.float16)[..., 0].astype(np.float32)


def _flat(a: U8, rows: int) -> U8:
    return np.ascontiguousarray(a).reshape(rows, -1)


def pack(raw: U8, qtype: Q, rows: int, cols: int) -> Planes:
    """A GGUF tensor's bytes, ``rows`` rows of ``cols`` values of type ``qtype`` (a key of
    :data:`FORMATS`), as :class:`Planes`.

    Raises:
        ValueError: ``raw`` does not hold exactly that many blocks.
    """
    fmt = FORMATS[qtype]
    if cols % fmt.block_size or raw.size != rows * cols // fmt.block_size * fmt.block_bytes:
        raise ValueError(
            f"{raw.size} bytes are not {rows} rows of {cols} {qtype.name} values "
            f"({fmt.block_bytes} bytes per {fmt.block_size})"
        )
    b = raw.reshape(rows, cols // fmt.block_size, fmt.block_bytes)
    empty_u8, empty_f32 = np.zeros((rows, 0), np.uint8), np.zeros((rows, 0), np.float32)
    qs, qh, sub = empty_u8, empty_u8, empty_u8
    scale, offset = empty_f32, empty_f32
    if qtype in (Q.F16, Q.BF16):
        qs = _flat(b, rows)
    elif qtype in (Q.Q4_0, Q.Q8_0, Q.Q5_0):
        scale = _f16(b[..., 0:2])
        qh = _flat(b[..., 2:6], rows) if qtype == Q.Q5_0 else empty_u8
        qs = _flat(b[..., 6:] if qtype == Q.Q5_0 else b[..., 2:], rows)
    elif qtype in (Q.Q4_1, Q.Q5_1):
        scale, offset = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        qh = _flat(b[..., 4:8], rows) if qtype == Q.Q5_1 else empty_u8
        qs = _flat(b[..., 8:] if qtype == Q.Q5_1 else b[..., 4:], rows)
    elif qtype in (Q.Q4_K, Q.Q5_K):
        scale, offset = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sub = _flat(_k_scales_mins(b[..., 4:16]), rows)
        qh = _flat(b[..., 16:48], rows) if qtype == Q.Q5_K else empty_u8
        qs = _flat(b[..., 48:] if qtype == Q.Q5_K else b[..., 16:], rows)
    else:  # Q6_K: ql[128], qh[64], int8 scales[16], d
        qs, qh = _flat(b[..., :128], rows), _flat(b[..., 128:192], rows)
        sub = _flat(b[..., 192:208], rows)
        scale = _f16(b[..., 208:210])
    return Planes(qs, qh, scale, offset, sub)


def _k_scales_mins(packed: U8) -> U8:
    """The 12 packed scale bytes of Q4_K/Q5_K blocks, (..., 12), as (..., 16): the 8 sub-block
    scales, then the 8 minimums (ggml's ``get_scale_min_k4``)."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return np.concatenate([sc, mins], axis=-1).astype(np.uint8)


@njit(inline="always", cache=True)
def decode_row(
    code: int,
    qs: np.ndarray,
    qh: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    sub: np.ndarray,
    out: np.ndarray,
    width: int,
) -> None:
    """One row's planes (of the type numbered ``code`` in :data:`FORMATS`) as float32 into
    ``out``, whose length is the row's number of values. ``width`` must be 32 (see the module
    docstring for why it is an argument). Each type's loops are its own, with no branch
    inside them, and every inner loop writes one contiguous run: what LLVM vectorises."""
    half = width // 2
    if code == Q8_0:
        q8 = qs.view(np.int8)
        for b in range(scale.shape[0]):
            d, o = scale[b], b * width
            for j in range(width):
                out[o + j] = np.float32(q8[o + j]) * d
    elif code == Q4_0:
        for b in range(scale.shape[0]):
            d, o, p = scale[b], b * width, b * half
            for j in range(half):
                out[o + j] = d * np.float32(np.int32(qs[p + j] & 0x0F) - 8)
            for j in range(half):
                out[o + half + j] = d * np.float32(np.int32(qs[p + j] >> 4) - 8)
    elif code == Q4_1:
        for b in range(scale.shape[0]):
            d, m, o, p = scale[b], offset[b], b * width, b * half
            for j in range(half):
                out[o + j] = d * np.float32(qs[p + j] & 0x0F) + m
            for j in range(half):
                out[o + half + j] = d * np.float32(qs[p + j] >> 4) + m
    elif code in (Q5_0, Q5_1):
        shift = 16 if code == Q5_0 else 0  # Q5_0 is signed: q - 16
        for b in range(scale.shape[0]):
            d, o, p = scale[b], b * width, b * half
            m = offset[b] if code == Q5_1 else np.float32(0.0)
            h = (
                np.uint32(qh[4 * b])
                | (np.uint32(qh[4 * b + 1]) << 8)
                | (np.uint32(qh[4 * b + 2]) << 16)
                | (np.uint32(qh[4 * b + 3]) << 24)
            )
            for j in range(half):
                q = np.int32(qs[p + j] & 0x0F) | np.int32(((h >> j) & 1) << 4)
                out[o + j] = d * np.float32(q - shift) + m
            for j in range(half):
                q = np.int32(qs[p + j] >> 4) | np.int32(((h >> (j + 16)) & 1) << 4)
                out[o + half + j] = d * np.float32(q - shift) + m
    elif code in (Q4_K, Q5_K):
        five = code == Q5_K
        for b in range(scale.shape[0]):  # super-blocks of 8 sub-blocks of 32
            for s in range(8):
                sc = scale[b] * np.float32(sub[16 * b + s])
                low = offset[b] * np.float32(sub[16 * b + 8 + s])
                o = b * 256 + s * width
                p = b * 128 + (s // 2) * width  # low nibbles of 32 bytes, then their high ones
                shift = 4 * (s % 2)
                if five:
                    for j in range(width):
                        q = ((qs[p + j] >> shift) & 0x0F) | (((qh[b * 32 + j] >> s) & 1) << 4)
                        out[o + j] = sc * np.float32(q) - low
                else:
                    for j in range(width):
                        out[o + j] = sc * np.float32((qs[p + j] >> shift) & 0x0F) - low
    elif code == Q6_K:
        q6s = sub.view(np.int8)
        for b in range(scale.shape[0]):  # 16 groups of 16: half k (128 values), quarter t
            for g in range(16):
                k, t = g // 8, (g // 2) % 4
                first = (g % 2) * half  # which 16 of the quarter's 32
                lo_at = b * 128 + k * 64 + (t % 2) * width + first
                hi_at = b * 64 + k * 32 + first
                lo_shift, hi_shift = 4 * (t // 2), 2 * t
                sc = scale[b] * np.float32(q6s[16 * b + g])
                o = b * 256 + g * half
                for j in range(half):
                    q = ((qs[lo_at + j] >> lo_shift) & 0x0F) | (
                        ((qh[hi_at + j] >> hi_shift) & 0x03) << 4
                    )
                    out[o + j] = sc * np.float32(np.int32(q) - 32)
    elif code == BF16:
        bf16_pairs(qs, out)
    else:
        f16_pairs(qs, out)


@njit(inline="always", cache=True)
def bf16_pairs(pairs: np.ndarray, out: np.ndarray) -> None:
    """Little-endian bfloat16 values, two bytes each in ``pairs``, as float32 into ``out``:
    a bfloat16 is the top half of a float32."""
    bits = out.view(np.uint32)
    for i in range(out.shape[0]):
        bits[i] = (np.uint32(pairs[2 * i]) << 16) | (np.uint32(pairs[2 * i + 1]) << 24)


@njit(inline="always", cache=True)
def f16_pairs(pairs: np.ndarray, out: np.ndarray) -> None:
    """Little-endian float16 values, two bytes each in ``pairs``, as float32 into ``out``
    (exact): the exponent rebiased in the bits, then zeros, subnormals, infinities and NaNs
    fixed in a second pass that only runs where one occurs."""
    bits = out.view(np.uint32)
    rare = False
    for i in range(out.shape[0]):
        h = np.uint32(pairs[2 * i]) | (np.uint32(pairs[2 * i + 1]) << 8)
        em = h & np.uint32(0x7FFF)
        bits[i] = ((h & 0x8000) << 16) | ((em << 13) + np.uint32(0x38000000))
        if em < 0x0400 or em >= 0x7C00:
            rare = True
    if rare:
        for i in range(out.shape[0]):
            h = np.uint32(pairs[2 * i]) | (np.uint32(pairs[2 * i + 1]) << 8)
            em, sign = h & np.uint32(0x7FFF), (h & 0x8000) << 16
            if em < 0x0400:  # zero or subnormal: em * 2^-24, exact
                v = np.float32(em) * np.float32(2.0**-24)
                out[i] = -v if sign else v
            elif em >= 0x7C00:
                bits[i] = sign | np.uint32(0x7F800000) | ((em & 0x3FF) << 13)
