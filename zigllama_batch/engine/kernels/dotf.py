"""Exact float32 products of a few activation rows with tiled Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0
weights, written as LLVM IR for numba.

Two to a few dozen activation rows (a few streams decoding, a sequence verifying its drafted
tokens) make a product bound by arithmetic, not by reading the weights: every decoded weight
meets every row. numba's loops (:func:`~.matmul.gemv_fused`) keep their partial sums in
memory, one load and one store per multiply-add, and reached a quarter of this machine's
multiply-add rate. Here :func:`chunk_kernel` computes a tile of :mod:`.tiles` (128 output
rows, 8 AVX-512 registers of float32) by 1-3 activation rows over all blocks with every
partial sum in a register: each 16 weight bytes are decoded once to float32 and serve every
row. The
values are those ``gguf``'s ``dequantize`` gives, with each block's scale factored out of its
sum as in :func:`~.matmul.gemv_fused` (``d sum_j q_j x_j + m sum_j x_j``); only the rounding of
the sums differs.

Where AVX-512 is missing, LLVM splits the 16-lane vectors in two (AVX2) or four (SSE): the
same values, at a lower speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .blocks import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

__all__ = ["CHUNKS", "LANES", "MAX_ROWS", "TYPES", "by_block_type", "chunk_kernel"]

LANES = 16
"""Output rows one call computes: the 16 float32 lanes of an AVX-512 register."""

CHUNKS = 8
"""Runs of 16 output rows one call computes: a whole tile's width (:data:`~.tiles.TILE`), so
the weights are read as one stream. (A call of one run, 16 bytes of every 128, ran at a fifth
of the speed; four runs at six rows spilled registers and ran at half.)"""

MAX_ROWS = 3
"""Most activation rows one call multiplies: a partial sum per row and run of 16 outputs in
registers (24), beside the decoded weights (AVX-512 has 32 registers; the block totals spill
to the stack, read and written once a block). A loop over the runs with up to 8 rows inside
(each decoded run serving every row, a pass for 8 rows) ran slower from 1 to 16 rows and no
faster at 48: 8192 x 2048 Q8_0 at 1 / 8 / 48 rows 1.04 / 2.12 / 9.1 ms against 0.56 / 1.51 /
8.7."""

TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
"""The block types (their numbers in :data:`~.blocks.FORMATS`) :func:`chunk_kernel` takes."""

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_B = ir.VectorType(_I8, LANES)  # one byte of each of 16 output rows
_VF = ir.VectorType(_F32, LANES)
_alloca: Any = cgutils.alloca_once_value  # numba's helpers are untyped
_for_range: Any = cgutils.for_range


def _splat(builder: Any, value: Any) -> Any:
    undef = ir.Constant(_VF, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def by_block_type(
    builder: Any, code: Any, codes: tuple[int, ...], emit: Callable[[int], None]
) -> None:
    """IR that runs ``emit(c)`` for the ``c`` of ``codes`` equal to the value ``code`` (any
    other value takes the last one's)."""
    first, *rest = codes
    if not rest:
        emit(first)
        return
    with builder.if_else(builder.icmp_signed("==", code, ir.Constant(code.type, first))) as (
        then,
        otherwise,
    ):
        with then:
            emit(first)
        with otherwise:
            by_block_type(builder, code, tuple(rest), emit)


def chunk_kernel(rows: int) -> Callable[..., None]:
    """The intrinsic ``kernel(code, qs, qh, scale, offset, x, sums, out, t, r0)`` for ``rows``
    activation rows (1 to :data:`MAX_ROWS`) and a weight of block type ``code`` (one of
    :data:`TYPES`): writes into ``out[r, :]`` (float32 (rows or more, TILE), C-contiguous) the
    products of tile ``t``'s output rows with activation rows ``r0 + r``.

    ``qs``/``qh`` (tiles, blocks, bytes, TILE) uint8 and ``scale``/``offset`` (tiles, blocks,
    TILE) float32 are a :class:`~.tiles.Tiles` weight's planes (C-contiguous); ``x`` (N, in) float32
    C-contiguous; ``sums`` (N, blocks) float32 each block's sum of ``x``.
    """

    def typer(
        typingctx: Any,
        code: Any,
        qs: Any,
        qh: Any,
        scale: Any,
        offset: Any,
        x: Any,
        sums: Any,
        out: Any,
        t: Any,
        r0: Any,
    ) -> Any:
        sig = types.void(code, qs, qh, scale, offset, x, sums, out, t, r0)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            arrays = [
                context.make_array(ty)(context, builder, a)
                for ty, a in zip(sig.args[1:8], args[1:8], strict=True)
            ]
            t, r0 = (builder.sext(a, _I64) if a.type.width < 64 else a for a in args[8:])
            by_block_type(
                builder,
                args[0],
                TYPES,
                lambda code: _chunk_body(builder, code, rows, arrays, t, r0),
            )
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _chunk_body(builder: Any, code: int, rows: int, arrays: list[Any], t: Any, r0: Any) -> None:
    """The IR of :func:`chunk_kernel` for one block type."""
    qs_a, qh_a, scale_a, offset_a, x_a, sums_a, out_a = arrays
    nibbles = code != Q8_0
    fifth = code in (Q5_0, Q5_1)  # a fifth bit per value, bit j of the block's 4 qh bytes
    n_blocks = builder.extract_value(qs_a.shape, 1)
    n_bytes = builder.extract_value(qs_a.shape, 2)
    tile = builder.extract_value(qs_a.shape, 3)
    x_width = builder.extract_value(x_a.shape, 1)
    fma = builder.module.declare_intrinsic(
        "llvm.fma.v16f32", fnty=ir.FunctionType(_VF, [_VF, _VF, _VF])
    )

    def k(n: int) -> ir.Constant:
        return ir.Constant(_I64, n)

    zero = ir.Constant(_VF, [0.0] * LANES)
    acc = [[_alloca(builder, zero) for _ in range(CHUNKS)] for _ in range(rows)]
    tile_blocks = builder.mul(t, n_blocks)
    with _for_range(builder, n_blocks) as loop:
        b = loop.index
        tb = builder.add(tile_blocks, b)
        w_start = builder.mul(builder.mul(tb, n_bytes), tile)
        x_start = [
            builder.add(builder.mul(builder.add(r0, k(r)), x_width), builder.mul(b, k(32)))
            for r in range(rows)
        ]

        def x_at(r: int, j: int) -> Any:
            p = builder.gep(x_a.data, [builder.add(x_start[r], k(j))])
            return _splat(builder, builder.load(p))

        def high_bit(v: int, ch: int) -> Any:
            """Value v's fifth bit, as 16 (or 0), for the 16 rows of run ch."""
            at = builder.add(
                builder.mul(builder.add(builder.mul(tb, k(4)), k(v >> 3)), tile), k(LANES * ch)
            )
            p = builder.gep(qh_a.data, [at])
            bits = builder.load(builder.bitcast(p, _B.as_pointer()), align=1)
            bit = builder.and_(
                builder.lshr(bits, ir.Constant(_B, [v & 7] * LANES)), ir.Constant(_B, [1] * LANES)
            )
            return builder.shl(bit, ir.Constant(_B, [4] * LANES))

        # One partial sum per row and chunk: rows x CHUNKS independent multiply-add chains.
        parts = [[zero] * CHUNKS for _ in range(rows)]
        for j in range(16 if nibbles else 32):
            xs = [(x_at(r, j), x_at(r, j + 16) if nibbles else None) for r in range(rows)]
            line = builder.add(w_start, builder.mul(k(j), tile))
            for ch in range(CHUNKS):
                p = builder.gep(qs_a.data, [builder.add(line, k(LANES * ch))])
                w = builder.load(builder.bitcast(p, _B.as_pointer()), align=1)
                if nibbles:  # byte j: value j in its low nibble, value j + 16 in its high
                    lo = builder.and_(w, ir.Constant(_B, [15] * LANES))
                    hi = builder.lshr(w, ir.Constant(_B, [4] * LANES))
                    if fifth:
                        lo = builder.or_(lo, high_bit(j, ch))
                        hi = builder.or_(hi, high_bit(j + 16, ch))
                    lo, hi = builder.uitofp(lo, _VF), builder.uitofp(hi, _VF)
                    for r, (x0, x1) in enumerate(xs):
                        parts[r][ch] = builder.call(fma, [lo, x0, parts[r][ch]])
                        parts[r][ch] = builder.call(fma, [hi, x1, parts[r][ch]])
                else:
                    v = builder.sitofp(w, _VF)
                    for r, (x0, _) in enumerate(xs):
                        parts[r][ch] = builder.call(fma, [v, x0, parts[r][ch]])
        sums = []
        for r in range(rows):
            row_b = builder.add(builder.mul(builder.add(r0, k(r)), n_blocks), b)
            sums.append(_splat(builder, builder.load(builder.gep(sums_a.data, [row_b]))))
        for ch in range(CHUNKS):
            at = builder.add(builder.mul(tb, tile), k(LANES * ch))
            dp = builder.gep(scale_a.data, [at])
            d = builder.load(builder.bitcast(dp, _VF.as_pointer()), align=4)
            if code in (Q4_1, Q5_1):
                mp = builder.gep(offset_a.data, [at])
                m = builder.load(builder.bitcast(mp, _VF.as_pointer()), align=4)
            for r in range(rows):
                part = parts[r][ch]
                if code in (Q4_0, Q5_0):  # values q - 8, q - 16
                    bias = _splat(builder, ir.Constant(_F32, 8.0 if code == Q4_0 else 16.0))
                    part = builder.fsub(part, builder.fmul(sums[r], bias))
                term = builder.fmul(d, part)
                if code in (Q4_1, Q5_1):  # + m * sum(x): the minimums' share
                    term = builder.call(fma, [m, sums[r], term])
                builder.store(builder.fadd(builder.load(acc[r][ch]), term), acc[r][ch])
    out_width = builder.extract_value(out_a.shape, 1)
    for r in range(rows):
        for ch in range(CHUNKS):
            at = builder.add(builder.mul(k(r), out_width), k(LANES * ch))
            p = builder.gep(out_a.data, [at])
            value = builder.load(acc[r][ch])
            builder.store(value, builder.bitcast(p, _VF.as_pointer()), align=4)
