"""Integer dot products of 8-bit weights and 8-bit activations, written as LLVM IR for numba.

LLVM does not turn a numba loop into ``vpdpbusd`` (AVX-512 VNNI: 64 products of an unsigned
and a signed byte summed four by four into 16 int32 lanes, one instruction) or into AVX2's
``vpmaddubsw`` + ``vpmaddwd`` pair, and numba has no vector types to call them with. This
module builds one intrinsic per row count: :func:`group_kernel` returns a numba intrinsic
(branching on the block type inside) that multiplies one group of 16 output rows of a weight in the interleaved layout of
:mod:`.int8` by 1-4 activation rows quantized to int8, over all blocks: each block's 64-byte
loads are unpacked once and serve every row. (The compiled code spills some vector registers
to the stack, 44 stack accesses over the nine variants; not examined further.)

Which instructions: :data:`ISA` is ``"avx512vnni"`` where the CPU has them (AMD Zen 4 and 5,
Intel Xeon since Ice Lake), else ``"avx2"``, else None (then :mod:`.int8` is unavailable).
The environment variable ``ZIGLLAMA_BATCH_INT8_ISA`` (``avx2`` or ``none``) asks for less, for
tests; numba's cache does not know of it, so set ``NUMBA_CACHE_DIR`` to a directory of its own
beside it.

Left out: AVX-VNNI (the 256-bit VEX form of Intel client cores, which take the AVX2 path),
ARM's ``sdot``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .blocks import Q4_0, Q4_1, Q8_0
from .dotf import by_block_type

__all__ = ["GROUP", "ISA", "MAX_ROWS", "Q8_BIAS", "group_kernel"]

GROUP = 16
"""Output rows one call computes: the 16 int32 lanes of an AVX-512 register."""

MAX_ROWS = 4
"""Most activation rows one call multiplies: each row needs two integer accumulators and a
float sum, beside the 8 vectors of a block's unpacked weights (AVX-512 has 32 registers)."""

_CHAINS = 2
"""Independent accumulators per row and block, so that consecutive ``vpdpbusd`` need not
wait for each other's result (its latency is several cycles). In-cache timings of 1, 2, 4 and
8 chains on an 8192 x 2048 Q4_0 matrix were within this machine's noise of each other."""


def _host_isa() -> str | None:
    features = llvm.get_host_cpu_features()
    forced = os.environ.get("ZIGLLAMA_BATCH_INT8_ISA")
    if forced == "none":
        return None
    if features.get("avx512vnni") and features.get("avx512bw") and forced != "avx2":
        return "avx512vnni"
    if features.get("avx2"):
        return "avx2"
    return None


ISA: str | None = _host_isa()

_I8, _I16, _I32, _I64, _F32 = (
    ir.IntType(8),
    ir.IntType(16),
    ir.IntType(32),
    ir.IntType(64),
    ir.FloatType(),
)
_W = ir.VectorType(_I8, 64)  # one chunk: 4 bytes of each of the 16 rows
_V = ir.VectorType(_I32, 16)
_alloca: Any = cgutils.alloca_once_value  # numba's helpers are untyped
_for_range: Any = cgutils.for_range
_VF = ir.VectorType(_F32, 16)


def _splat(builder: Any, value: Any, vtype: ir.VectorType) -> Any:
    undef = ir.Constant(vtype, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(
        one, undef, ir.Constant(ir.VectorType(_I32, vtype.count), [0] * vtype.count)
    )


def _dot4(builder: Any, acc: Any, weights: Any, x4: Any, signed: bool) -> Any:
    """``acc`` + in each lane, the sum of its 4 weight bytes (unsigned, or with ``signed``
    signed) times the 4 signed bytes of ``x4`` (an int32 splat)."""
    if ISA == "avx512vnni":
        assert not signed, "VNNI multiplies unsigned weights: Q8_0 is stored offset"
        fn = builder.module.declare_intrinsic(
            "llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(_V, [_V, _V, _V])
        )
        return builder.call(fn, [acc, builder.bitcast(weights, _V), x4])
    # AVX2: pairs of byte products to int16, pairs of those to int32. The pairs saturate past
    # 32767, so signed weights go as |w| times x with w's sign (at most 2 x 128 x 127).
    b32, h16 = ir.VectorType(_I8, 32), ir.VectorType(_I16, 16)
    madd = builder.module.declare_intrinsic(
        "llvm.x86.avx2.pmadd.ub.sw", fnty=ir.FunctionType(h16, [b32, b32])
    )
    wd = builder.module.declare_intrinsic(
        "llvm.x86.avx2.pmadd.wd", fnty=ir.FunctionType(ir.VectorType(_I32, 8), [h16, h16])
    )
    sign = builder.module.declare_intrinsic(
        "llvm.x86.avx2.psign.b", fnty=ir.FunctionType(b32, [b32, b32])
    )
    ones = ir.Constant(h16, [1] * 16)
    xb = builder.bitcast(x4, _W)
    halves = []
    for h in range(2):
        idx = ir.Constant(ir.VectorType(_I32, 32), list(range(32 * h, 32 * h + 32)))
        w = builder.shuffle_vector(weights, weights, idx)
        x = builder.shuffle_vector(xb, xb, idx)
        if signed:
            x = builder.call(sign, [x, w])
            negative = builder.icmp_signed("<", w, ir.Constant(b32, [0] * 32))
            w = builder.select(negative, builder.neg(w), w)
        halves.append(builder.call(wd, [builder.call(madd, [w, x]), ones]))
    both = builder.shuffle_vector(
        halves[0], halves[1], ir.Constant(ir.VectorType(_I32, 16), list(range(16)))
    )
    return builder.add(acc, both)


Q8_BIAS = 128 if ISA == "avx512vnni" else 0
"""What :class:`.int8.Packed` adds to Q8_0's signed bytes: VNNI multiplies unsigned bytes by
signed ones, so they are stored as ``q + 128`` and the kernel takes 128 times the
activations' sum back off; AVX2 multiplies them signed."""


def group_kernel(rows: int) -> Callable[..., None]:
    """The intrinsic ``kernel(code, wq, scale, offset, x4, sums, dx, tile, g, r0)`` for
    ``rows`` activation rows (1 to :data:`MAX_ROWS`) and weights of block type ``code`` (Q4_0,
    Q4_1 or Q8_0): writes into ``tile[r, :]`` (float32 (MAX_ROWS, 16)) the products of group
    ``g``'s 16 weight rows with activation rows ``r0 + r``.

    ``wq`` (groups, blocks, chunk bytes) uint8 and ``scale``/``offset`` (groups, blocks, 16)
    float32 are the layout of :class:`.int8.Packed`; ``x4`` (rows, blocks * 8) int32 the
    activations' bytes, four to a value; ``sums`` (rows, blocks) int32 each block's sum of
    them; ``dx`` (rows, blocks) float32 each block's scale.
    """

    def typer(
        typingctx: Any,
        code: Any,
        wq: Any,
        scale: Any,
        offset: Any,
        x4: Any,
        sums: Any,
        dx: Any,
        tile: Any,
        g: Any,
        r0: Any,
    ) -> Any:
        sig = types.void(code, wq, scale, offset, x4, sums, dx, tile, g, r0)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            arrays = [
                context.make_array(t)(context, builder, a)
                for t, a in zip(sig.args[1:8], args[1:8], strict=True)
            ]
            g, r0 = (builder.sext(a, _I64) if a.type.width < 64 else a for a in args[8:])
            by_block_type(
                builder,
                args[0],
                (Q4_0, Q4_1, Q8_0),
                lambda code: _group_body(builder, code, rows, arrays, g, r0),
            )
            return context.get_dummy_value()

        return sig, codegen

    return intrinsic(typer)


def _group_body(builder: Any, code: int, rows: int, arrays: list[Any], g: Any, r0: Any) -> None:
    """The IR of :func:`group_kernel` for one block type."""
    wq_a, scale_a, offset_a, x_a, sums_a, dx_a, tile_a = arrays
    nibbles = code in (Q4_0, Q4_1)
    chunks = 4 if nibbles else 8  # 64-byte loads per block and group
    # What each block's integer sum is short of: Q4_0's values are q - 8, Q8_0's stored bytes
    # are q + 128 where vpdpbusd's first operand is unsigned.
    bias = {Q4_0: 8, Q8_0: Q8_BIAS, Q4_1: 0}[code]
    signed = code == Q8_0 and not Q8_BIAS
    n_blocks = builder.extract_value(wq_a.shape, 1)
    block_bytes = builder.extract_value(wq_a.shape, 2)
    x_width = builder.extract_value(x_a.shape, 1)

    def c(n: int) -> ir.Constant:
        return ir.Constant(_I64, n)

    acc = [_alloca(builder, ir.Constant(_VF, [0.0] * 16)) for _ in range(rows)]
    group_start = builder.mul(builder.mul(g, n_blocks), block_bytes)
    with _for_range(builder, n_blocks) as loop:
        b = loop.index
        w_start = builder.add(group_start, builder.mul(b, block_bytes))
        weights = []
        for k in range(chunks):
            p = builder.gep(wq_a.data, [builder.add(w_start, c(64 * k))])
            w = builder.load(builder.bitcast(p, _W.as_pointer()), align=1)
            if nibbles:  # byte j: value j in its low nibble, value j + 16 in its high
                weights.append(builder.and_(w, ir.Constant(_W, [15] * 64)))
                weights.append(builder.lshr(w, ir.Constant(_W, [4] * 64)))
            else:
                weights.append(w)
        gb = builder.add(builder.mul(g, n_blocks), b)
        sp = builder.gep(scale_a.data, [builder.mul(gb, c(16))])
        d = builder.load(builder.bitcast(sp, _VF.as_pointer()), align=4)
        if code == Q4_1:
            op = builder.gep(offset_a.data, [builder.mul(gb, c(16))])
            m = builder.load(builder.bitcast(op, _VF.as_pointer()), align=4)
        for r in range(rows):
            row = builder.add(r0, c(r))
            x_start = builder.add(builder.mul(row, x_width), builder.mul(b, c(8)))
            chains = [ir.Constant(_V, [0] * 16) for _ in range(_CHAINS)]
            for k, w in enumerate(weights):
                # Q4: weights 2k, 2k + 1 hold values 4k.. and 16 + 4k..; Q8_0: 4k..
                at = (k // 2 + (k % 2) * 4) if nibbles else k
                x4 = builder.load(builder.gep(x_a.data, [builder.add(x_start, c(at))]))
                chains[k % _CHAINS] = _dot4(
                    builder, chains[k % _CHAINS], w, _splat(builder, x4, _V), signed
                )
            total = chains[0]
            for other in chains[1:]:
                total = builder.add(total, other)
            at_row = builder.add(builder.mul(row, n_blocks), b)
            s = builder.load(builder.gep(sums_a.data, [at_row]))
            dxv = _splat(builder, builder.load(builder.gep(dx_a.data, [at_row])), _VF)
            if bias:
                total = builder.sub(
                    total, _splat(builder, builder.mul(s, ir.Constant(_I32, bias)), _V)
                )
            term = builder.fmul(builder.sitofp(total, _VF), builder.fmul(d, dxv))
            if code == Q4_1:  # + m * sum(x): the minimums' share
                sxf = builder.fmul(dxv, _splat(builder, builder.sitofp(s, _F32), _VF))
                term = builder.fadd(term, builder.fmul(m, sxf))
            builder.store(builder.fadd(builder.load(acc[r]), term), acc[r])
    for r in range(rows):
        tp = builder.gep(tile_a.data, [c(16 * r)])
        builder.store(builder.load(acc[r]), builder.bitcast(tp, _VF.as_pointer()), align=4)
