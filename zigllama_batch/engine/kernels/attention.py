"""numba kernel: attention of single-token (decode) items over their cache slots.

Each item attends with its query heads to positions ``[start, end)`` of its own slot; the
query heads that share a key/value head read that head's keys and values once. Threads take
(item, key/value head) pairs. One call per layer whatever the slots are, so no copy or view of
the cache is made, and an item's result never depends on the other items of the step.
Softmax in float32, with the maximum subtracted, as numpy's path for prompt chunks does.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["decode_attention"]


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
                e = np.exp(scores[h, p] - top)
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
