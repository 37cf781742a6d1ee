"""numba kernels: attention over cache slots, of decode items and of prompt chunks.

:func:`decode_attention`: each single-token item attends with its query heads to positions
``[start, end)`` of its own slot; the query heads that share a key/value head read that
head's keys and values once. Threads take (item, key/value head) pairs. One call per layer
whatever the slots are, so no copy or view of the cache is made, and an item's result never
depends on the other items of the step.

:func:`prefill_attention`: one prompt chunk, causal, threads taking (key/value head, block of
queries) pairs, the products in BLAS.

Softmax in float32, with the maximum subtracted, and :func:`~.elementwise.exp`.

:func:`rope_store`: what comes before attention, in one pass over the new tokens: RoPE on
their queries and keys, the queries scaled, the keys and values written to the cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .elementwise import exp

__all__ = ["decode_attention", "prefill_attention", "rope_store", "rope_store_parallel"]


@njit(parallel=True, fastmath=True, cache=True)
def decode_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slots: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out[i]``: softmax(q[i] K^T) V over positions ``starts[i]:ends[i]`` of slot
    ``slots[i]``. q, out: (items, H, hd) float32, q already scaled; caches: (slots, KVH,
    positions, hd) float32; slots, starts, ends: (items,) int64, ``starts < ends``."""
    n_items, n_heads, hd = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    for task in prange(n_items * n_kv):
        i, g = task // n_kv, task % n_kv
        s, lo, n = slots[i], starts[i], ends[i] - starts[i]
        scores = np.empty((group, n), np.float32)  # (G, L)
        for p in range(n):
            for h in range(group):
                acc = np.float32(0.0)
                for d in range(hd):
                    acc += q[i, g * group + h, d] * k_cache[s, g, lo + p, d]
                scores[h, p] = acc
        for h in range(group):
            top = scores[h, 0]
            for p in range(1, n):
                top = max(top, scores[h, p])
            total = np.float32(0.0)
            for p in range(n):
                e = exp(scores[h, p] - top)
                scores[h, p] = e
                total += e
            inverse = np.float32(1.0) / total
            for p in range(n):
                scores[h, p] *= inverse
        mixed = np.zeros((group, hd), np.float32)  # (G, hd)
        for p in range(n):
            for h in range(group):
                w = scores[h, p]
                for d in range(hd):
                    mixed[h, d] += w * v_cache[s, g, lo + p, d]
        for h in range(group):
            for d in range(hd):
                out[i, g * group + h, d] = mixed[h, d]


@njit(parallel=True, fastmath=True, cache=True)
def prefill_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slot: int,
    start: int,
    window: int,
    block: int,
    out: np.ndarray,
) -> None:
    """Causal attention of one prompt chunk over its slot: ``out[g, i, h]`` is query
    ``q[g, i, h]`` (the chunk's token i, at position ``start + i``) over the positions it
    sees, ``(start + i - window, start + i]`` (``window`` 0: all from 0). q, out: (KVH, T, G,
    hd) float32 C-contiguous, q already scaled; caches: (slots, KVH, positions, hd).

    Threads take (key/value head, block of ``block`` queries) pairs; each multiplies its
    queries with the keys they can see and the weights with the values in two BLAS calls
    (scipy's BLAS, one thread in each of numba's), so no numpy BLAS thread starts between the
    compiled kernels of a step."""
    n_kv, t, group, hd = q.shape
    n_blocks = -(-t // block)
    for task in prange(n_kv * n_blocks):
        g, b0 = task // n_blocks, (task % n_blocks) * block
        b1 = min(t, b0 + block)
        nb, end = b1 - b0, start + b1
        lo = 0 if window == 0 else max(0, start + b0 - window + 1)  # first position seen
        queries = q[g, b0:b1].reshape(nb * group, hd)
        scores = np.dot(queries, k_cache[slot, g, lo:end].T)  # (nb G, L)
        total = np.empty(nb * group, np.float32)
        for i in range(nb):
            pos = start + b0 + i
            first = 0 if window == 0 else max(0, pos - window + 1) - lo  # columns seen:
            last = pos - lo + 1  # [first, last)
            for h in range(group):
                r = i * group + h
                top = scores[r, first]
                for p in range(first + 1, last):
                    top = max(top, scores[r, p])
                s = np.float32(0.0)
                for p in range(first):
                    scores[r, p] = 0.0
                for p in range(first, last):
                    e = exp(scores[r, p] - top)
                    scores[r, p] = e
                    s += e
                for p in range(last, end - lo):
                    scores[r, p] = 0.0
                total[r] = s
        mixed = np.dot(scores, v_cache[slot, g, lo:end])  # (nb G, hd), normalised after
        for r in range(nb * group):
            inverse = np.float32(1.0) / total[r]
            i, h = r // group, r % group
            for d in range(hd):
                out[g, b0 + i, h, d] = mixed[r, d] * inverse


@njit(inline="always", cache=True)
def _rope_row(
    qk: np.ndarray,
    v: np.ndarray,
    rotation: np.ndarray,
    scale: float,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slot: int,
    position: int,
    q_out: np.ndarray,
) -> None:
    n_heads = q_out.shape[0]
    half = rotation.shape[0] // 2
    s = np.float32(scale)
    for h in range(qk.shape[0]):
        for i in range(half):
            a, b = qk[h, 2 * i], qk[h, 2 * i + 1]
            c, d = rotation[2 * i], rotation[2 * i + 1]
            real, imag = a * c - b * d, a * d + b * c
            if h < n_heads:
                q_out[h, 2 * i] = real * s
                q_out[h, 2 * i + 1] = imag * s
            else:
                k_cache[slot, h - n_heads, position, 2 * i] = real
                k_cache[slot, h - n_heads, position, 2 * i + 1] = imag
    for g in range(v.shape[0]):
        for d in range(v.shape[1]):
            v_cache[slot, g, position, d] = v[g, d]


@njit(cache=True)
def rope_store(
    qk: np.ndarray,
    v: np.ndarray,
    rotation: np.ndarray,
    scale: float,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slots: np.ndarray,
    positions: np.ndarray,
    q_out: np.ndarray,
) -> None:
    """RoPE on the new tokens' query and key heads, the queries scaled into ``q_out`` (N, H,
    hd), the keys and values written to their slots' positions of the caches. qk: (N, H +
    KVH, hd); v: (N, KVH, hd); rotation: (N, hd), each pair of dims ``(cos, sin)`` of the
    token's angle; slots, positions: (N,) int64. The complex product ``(a c - b d, a d +
    b c)``, then the scale."""
    for n in range(qk.shape[0]):
        _rope_row(
            qk[n], v[n], rotation[n], scale, k_cache, v_cache, slots[n], positions[n], q_out[n]
        )


@njit(parallel=True, cache=True)
def rope_store_parallel(
    qk: np.ndarray,
    v: np.ndarray,
    rotation: np.ndarray,
    scale: float,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slots: np.ndarray,
    positions: np.ndarray,
    q_out: np.ndarray,
) -> None:
    """:func:`rope_store`, tokens spread over the threads (a prompt chunk: distinct
    positions, so no two threads write the same cache row)."""
    for n in prange(qk.shape[0]):
        _rope_row(
            qk[n], v[n], rotation[n], scale, k_cache, v_cache, slots[n], positions[n], q_out[n]
        )
