"""numba kernels: the row-wise steps of a block between its products, RMSNorm and the gated
activation.

numpy computes each in several passes over the rows, on one thread (RMSNorm: a sum of
squares, a division, a multiply; SiLU: a negation, ``exp``, an add, a division, then the
product with ``up``). Here each is one pass over a row that stays in L1, rows spread over the
threads; RMSNorm of a few rows (decode) runs on the calling thread, where starting the threads
would cost more than the work.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bytes8 import float_bits

__all__ = [
    "GELU_TANH",
    "MANY_ROWS",
    "SILU",
    "gated",
    "rms_parallel",
    "rms_serial",
]

MANY_ROWS = 16
"""Rows from which the threads share an RMSNorm (2048-wide rows: 1.8 us for 8 rows on one
thread, 2.6 on two; 16 rows 4.0 and 3.7)."""

SILU = 0
GELU_TANH = 1

_GELU_C = np.float32(np.sqrt(2.0 / np.pi))


_EXP_HI = np.float32(88.37626)  # e^x below float32's largest, 2^127 at most
_EXP_LO = np.float32(-87.33654)  # e^x at float32's smallest normal, 2^-126
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # ln 2 in two parts: n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)


@njit(inline="always", fastmath=True, cache=True)
def exp(value: float) -> np.float32:
    """``e^x`` in float32 within about 2 ulp (Cephes' ``expf``: ``x = n ln2 + r``, a
    polynomial for ``e^r``, ``2^n`` put in the exponent bits), in arithmetic LLVM vectorises:
    numba's ``np.exp`` is a scalar call to libm per value (no SVML in pip's llvmlite); this
    one takes 0.26 ns a value on one core. Inputs are clamped to [-87.3, 88.4]: below, the
    result is about the smallest normal float instead of a subnormal or zero."""
    x = min(max(np.float32(value), _EXP_LO), _EXP_HI)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    scale: np.float32 = float_bits((np.int32(n) + np.int32(127)) << np.int32(23))  # 2^n
    result: np.float32 = p * scale
    return result


@njit(inline="always", fastmath=True, cache=True)
def _rms_row(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    inverse = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[0]) + np.float32(eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * inverse * weight[i]


@njit(fastmath=True, cache=True)
def rms_serial(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """``out[n]``: RMSNorm of row ``x[n]`` times ``weight``; x, out (N, D) float32."""
    for n in range(x.shape[0]):
        _rms_row(x[n], weight, eps, out[n])


@njit(parallel=True, fastmath=True, cache=True)
def rms_parallel(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """:func:`rms_serial`, rows spread over the threads."""
    for n in prange(x.shape[0]):
        _rms_row(x[n], weight, eps, out[n])


@njit(inline="always", fastmath=True, cache=True)
def _gated_row(gate_up: np.ndarray, kind: int, out: np.ndarray) -> None:
    width = out.shape[0]
    for j in range(width):
        g, u = gate_up[j], gate_up[width + j]
        if kind == SILU:
            out[j] = g / (np.float32(1.0) + exp(-g)) * u
        else:  # 1 + tanh(y) = 2 - 2 / (e^2y + 1)
            inner = _GELU_C * g * (np.float32(1.0) + np.float32(0.044715) * g * g)
            one_plus_tanh = np.float32(2.0) - np.float32(2.0) / (exp(inner + inner) + 1)
            out[j] = np.float32(0.5) * g * one_plus_tanh * u


@njit(parallel=True, fastmath=True, cache=True)
def gated(gate_up: np.ndarray, kind: int, out: np.ndarray) -> None:
    """``out[n] = act(gate) * up`` for row n of ``gate_up`` (N, 2F): gate its first F values,
    up the rest; ``kind`` :data:`SILU` or :data:`GELU_TANH`. out: (N, F) float32.

    Always on the threads, even for one row: compiled without ``parallel``, LLVM leaves this
    loop scalar (one 1536-wide row: 4.6 us, against 3.2 us here; 8 rows 35 against 5.3)."""
    for n in prange(out.shape[0]):
        _gated_row(gate_up[n], kind, out[n])
