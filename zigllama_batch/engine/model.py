"""Llama-family forward pass in numpy, one ragged batch per call (selective batching, as in Orca).

Inside: :class:`LLaMAModel`, whose :meth:`~LLaMAModel.step` is the only forward entry point. One
step runs any mix of sequences, each a :class:`~zigllama_batch.engine.step.SequenceStep`: some
feed a chunk of their prompt, others one decode token.

- Embedding, RMSNorm, the fused Q/K/V projection, the output projection and the gated MLP run
  once over all new tokens concatenated: one matrix multiply per weight per step.
- Attention runs against each sequence's KV-cache slot. Decode items (one token, or a few:
  drafts to verify) go to one compiled kernel per layer
  (:func:`~zigllama_batch.engine.kernels.attend_decode`), each token over the positions up to
  its own; prompt chunks one by one, each in one call
  (:func:`~zigllama_batch.engine.kernels.attend_prefill`) with a causal mask.
  A windowed layer (Gemma 3's local layers) attends only to its window's positions.
- Only each item's last new token goes through the output head (its last ``1 + draft`` when it
  verifies drafts, all of them when its prompt chunk is scored: ``SequenceStep.logit_rows``).
- Every product with a weight matrix goes through :func:`~zigllama_batch.engine.kernels.linear`,
  whatever the weight's GGUF type: the weights stay quantized, and which kernel runs for how
  many rows is the kernels module's business.

One block, top to bottom, for every architecture: RMSNorm -> Q/K/V (+ biases) -> per-head q/k
RMSNorm -> RoPE -> attention -> output projection (-> RMSNorm) -> residual add; RMSNorm -> gated
MLP (SiLU or tanh-GELU) (-> RMSNorm) -> residual add. The optional steps run where the weights
hold the tensor; which ones exist, the activation, the embedding scale and the windows come from
the architecture table (:mod:`~zigllama_batch.engine.architecture`), read once here.

RoPE rotates adjacent pairs of dimensions ``(2i, 2i+1)`` of every head: the layout llama.cpp's
converter writes Llama Q/K weights in, and the one the loader reorders other architectures' Q/K
columns into (Hugging Face's "rotate half" on the original order is the same computation).
Shapes use N = new tokens in the step, B = items, H = query heads, KVH = key/value heads,
G = H // KVH, D = model width, hd = head width, L = attended positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..kv.storage import KVCache
from .architecture import Activation
from .gguf_loader import LayerWeights, LlamaConfig, LlamaWeights
from .kernels import (
    attend_decode,
    attend_prefill,
    embedding_rows,
    gated_activation,
    linear,
    rms_norm,
    rotate_and_store,
)
from .step import SequenceStep

__all__ = ["LLaMAModel"]

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]


class LLaMAModel:
    """A Llama-family decoder (Llama, Qwen2, Qwen3, Gemma 3) over weights kept in their GGUF
    block types, computing in float32.

    The model holds no per-sequence state: keys and values live in a :class:`KVCache` passed to
    each :meth:`step`, so several caches (or several disjoint slot sets of one cache) can use the
    same weights. A step is safe to run in a worker thread while the caller's event loop runs.
    """

    def __init__(self, config: LlamaConfig, weights: LlamaWeights) -> None:
        self.config = config
        self.weights = weights
        arch = config.architecture
        self._embed_scale = np.float32(np.sqrt(config.dim)) if arch.scale_embeddings else None
        self._gelu = arch.activation is Activation.GELU_TANH
        # RoPE tables: one for the file's base; windowed layers may have a base of their own.
        self._rope: list[tuple[float, float, LlamaWeights | None]] = [
            (config.rope_base, config.rope_scale, weights)
        ]
        self._windows = [config.window(i) for i in range(config.n_layers)]
        self._window_set = set(self._windows)  # one decode plan per distinct window
        self._table_of_layer = [0] * config.n_layers
        if arch.local_rope_base is not None and any(self._windows):
            self._rope.append((arch.local_rope_base, 1.0, None))
            self._table_of_layer = [0 if w is None else 1 for w in self._windows]
        self._rotations = self._rope_tables(min(config.context_length, _ROPE_POSITIONS))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model scores."""
        return self.config.vocab_size

    def new_cache(self, n_slots: int, max_context: int | None = None) -> KVCache:
        """A KV cache for this model with ``n_slots`` slots of ``max_context`` positions
        (default: the model's context length).

        Raises:
            ValueError: ``max_context`` is beyond the model's context length.
        """
        c = self.config
        max_context = max_context or c.context_length
        if not 2 <= max_context <= c.context_length:
            raise ValueError(
                f"max_context: must be in [2, {c.context_length}] (the model's context "
                f"length), got {max_context}"
            )
        return KVCache(
            n_layers=c.n_layers,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            n_slots=n_slots,
            max_context=max_context,
        )

    def step(self, items: Sequence[SequenceStep], cache: KVCache) -> F32:
        """Run one forward step over a ragged batch and return the next-token logits of each
        item's last ``item.logit_rows`` new tokens: its last one, the ``draft`` tokens before it
        too for an item that has drafted tokens to verify, every one for a scored prompt chunk.

        Writes the new tokens' keys and values into their slots of ``cache``.

        Args:
            items: one entry per sequence; slots must be distinct (sampling states are not
                read here).
            cache: the cache whose slots the items name.

        Returns:
            ``(rows, vocab_size)`` float32 logits: for each item in order, ``item.logit_rows``
            rows (its last new tokens); one row per item when none drafts or is scored.

        Raises:
            ValueError: an item names a bad slot, is empty, overruns the cache, holds a token
                id outside the vocabulary or drafts as many tokens as it feeds.
        """
        if not items:
            return np.zeros((0, self.vocab_size), np.float32)
        end = max(item.start_pos + len(item.token_ids) for item in items)
        if end > len(self._rotations[0]) and end <= self.config.context_length:
            length = min(self.config.context_length, 1 << (end - 1).bit_length())
            self._rotations = self._rope_tables(length)  # positions further than ever before
        batch = _Batch.build(items, cache, self.vocab_size, self._rotations, self._window_set)
        w = self.weights
        x = embedding_rows(w.embed, batch.token_ids)  # (N, D), a copy
        if self._embed_scale is not None:
            x *= self._embed_scale
        for i, layer in enumerate(w.layers):
            rotation = batch.rotations[self._table_of_layer[i]]
            self._layer(x, layer, cache.k[i], cache.v[i], batch, rotation, self._windows[i])
        last = rms_norm(x[batch.last_rows], w.output_norm, self.config.rms_eps)  # (R, D)
        return linear(last, w.output)  # (R, vocab)

    def _layer(
        self,
        x: F32,
        layer: LayerWeights,
        k_cache: F32,
        v_cache: F32,
        batch: _Batch,
        rotation: NDArray[np.complex64],
        window: int | None,
    ) -> None:
        """One transformer block, updating the residual stream ``x`` (N, D) in place.
        ``rotation``: (N, 1, hd/2) RoPE factors of the new tokens; ``window``: positions each
        token attends to, or None for all earlier ones."""
        c = self.config
        n, hd = x.shape[0], c.head_dim
        q_width, kv_width = c.n_heads * hd, c.n_kv_heads * hd

        h = rms_norm(x, layer.attn_norm, c.rms_eps)
        qkv = linear(h, layer.wqkv)  # (N, (H + 2 KVH) hd)
        if layer.bqkv is not None:
            qkv += layer.bqkv
        qk = qkv[:, : q_width + kv_width].reshape(n, c.n_heads + c.n_kv_heads, hd)
        if layer.q_norm is not None and layer.k_norm is not None:  # per-head RMSNorm
            q_normed = rms_norm(qk[:, : c.n_heads].reshape(-1, hd), layer.q_norm, c.rms_eps)
            k_normed = rms_norm(qk[:, c.n_heads :].reshape(-1, hd), layer.k_norm, c.rms_eps)
            qk = np.concatenate(
                [q_normed.reshape(n, c.n_heads, hd), k_normed.reshape(n, c.n_kv_heads, hd)],
                axis=1,
            )
        v = qkv[:, q_width + kv_width :].reshape(n, c.n_kv_heads, hd)
        # RoPE on queries and keys (pairs of dims as complex numbers times e^(i angle)), keys
        # and values into their slots, the queries scaled: (N, H, hd).
        q = rotate_and_store(
            qk, v, rotation, c.query_scale, k_cache, v_cache, batch.token_slots, batch.positions
        )
        attn = np.empty((n, c.n_heads, hd), np.float32)  # (N, H, hd)
        if batch.decode_rows.size:
            attn[batch.decode_rows] = attend_decode(
                q[batch.decode_rows],
                k_cache,
                v_cache,
                batch.decode_slots,
                batch.decode_starts[window],
                batch.decode_ends,
            )
        for item_index in batch.prefill_items:
            rows = batch.rows[item_index]
            attn[rows] = attend_prefill(
                q[rows],
                k_cache,
                v_cache,
                batch.slots[item_index],
                batch.starts[item_index],
                window,
            )
        out = linear(attn.reshape(n, q_width), layer.wo)  # (N, D)
        if layer.post_attn_norm is not None:
            out = rms_norm(out, layer.post_attn_norm, c.rms_eps)
        x += out

        h = rms_norm(x, layer.ffn_norm, c.rms_eps)
        gate_up = linear(h, layer.w_gate_up)  # (N, 2F)
        act = gated_activation(gate_up, self._gelu)  # (N, F): act(gate) * up
        out = linear(act, layer.w_down)
        if layer.post_ffn_norm is not None:
            out = rms_norm(out, layer.post_ffn_norm, c.rms_eps)
        x += out

    def _rope_tables(self, length: int) -> list[NDArray[np.complex64]]:
        return [_rotation(self.config, *params, length) for params in self._rope]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LLaMAModel({c.name!r}, layers={c.n_layers}, dim={c.dim}, heads={c.n_heads}/"
            f"{c.n_kv_heads}, vocab={c.vocab_size}, context={c.context_length}, "
            f"weights={self.weights.nbytes / 2**20:.0f} MiB)"
        )


@dataclass(slots=True)
class _Batch:
    """Index arrays that every layer of one step reuses."""

    token_ids: I64  # (N,)
    positions: I64  # (N,) absolute position of every new token
    token_slots: I64  # (N,) cache slot of every new token
    rows: list[slice]  # per item: its rows among the N tokens
    last_rows: I64  # (R,) rows whose logits the step returns: each item's last logit_rows
    slots: list[int]
    starts: list[int]
    prefill_items: list[int]  # items of more than _FEW_TOKENS new tokens
    decode_rows: I64  # (Bd,) rows of the other items (one token, or a few: drafts, forced)
    decode_slots: I64  # (Bd,) their cache slots
    decode_ends: I64  # (Bd,) positions each row sees, its own included
    # Per attention window: the first position each decode item attends to.
    decode_starts: dict[int | None, I64]
    rotations: list[NDArray[np.complex64]]  # per RoPE table: (N, 1, hd/2) factor of each token

    @staticmethod
    def build(
        items: Sequence[SequenceStep],
        cache: KVCache,
        vocab_size: int,
        rotations: Sequence[NDArray[np.complex64]],
        windows: set[int | None],
    ) -> _Batch:
        seen: set[int] = set()
        token_ids: list[int] = []
        positions: list[np.ndarray] = []
        token_slots: list[np.ndarray] = []
        rows: list[slice] = []
        prefill_items: list[int] = []
        decode: list[tuple[int, int, int]] = []  # (row, slot, start)
        for i, item in enumerate(items):
            n = len(item.token_ids)
            if not 0 <= item.slot < cache.n_slots:
                raise ValueError(f"item {i}: slot {item.slot} outside [0, {cache.n_slots})")
            if item.slot in seen:
                raise ValueError(f"item {i}: slot {item.slot} appears twice in one step")
            seen.add(item.slot)
            if n == 0:
                raise ValueError(f"item {i}: no new tokens")
            if not 0 <= item.draft < n:
                raise ValueError(f"item {i}: {item.draft} drafted of {n} new tokens")
            if item.start_pos < 0 or item.start_pos + n > cache.max_context:
                raise ValueError(
                    f"item {i}: positions {item.start_pos}..{item.start_pos + n - 1} do not fit "
                    f"a cache of {cache.max_context}"
                )
            row0 = len(token_ids)
            token_ids.extend(item.token_ids)
            positions.append(np.arange(item.start_pos, item.start_pos + n))
            token_slots.append(np.full(n, item.slot))
            rows.append(slice(row0, row0 + n))
            if n <= _FEW_TOKENS:
                decode.extend((row0 + t, item.slot, item.start_pos + t) for t in range(n))
            else:
                prefill_items.append(i)
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        all_positions = np.concatenate(positions)
        decode_rows, decode_slots, decode_starts = np.array(decode, np.int64).reshape(-1, 3).T
        decode_ends = decode_starts + 1
        return _Batch(
            token_ids=ids,
            positions=all_positions,
            token_slots=np.concatenate(token_slots),
            rows=rows,
            last_rows=np.concatenate(
                [
                    np.arange(r.stop - it.logit_rows, r.stop)
                    for r, it in zip(rows, items, strict=True)
                ]
            ),
            slots=[item.slot for item in items],
            starts=[item.start_pos for item in items],
            prefill_items=prefill_items,
            decode_rows=decode_rows,
            decode_slots=decode_slots,
            decode_ends=decode_ends,
            decode_starts={
                w: np.zeros_like(decode_ends) if w is None else np.maximum(decode_ends - w, 0)
                for w in windows
            },
            rotations=[r[all_positions][:, None, :] for r in rotations],
        )


_FEW_TOKENS = 16
"""Items of at most this many new tokens (a decode token with drafts to verify, or with the
tokens a constraint forced) attend row by row in the compiled kernel, each row to the
positions up to its own; longer ones (prompt chunks) in blocks of queries
(:func:`~zigllama_batch.engine.kernels.attend_prefill`). A 5-token item of the default model:
0.2 ms a layer as a block with numpy's BLAS, ~0.05 ms in the row kernel."""

_ROPE_POSITIONS = 4096
"""Positions the RoPE tables cover at first; they grow (to a power of two) the first time a
step goes further. Gemma 3's two tables over its whole 32,768-position context took 64 MiB."""


def _rotation(
    config: LlamaConfig, base: float, scale: float, weights: LlamaWeights | None, length: int
) -> NDArray[np.complex64]:
    """RoPE factors of the first ``length`` positions, (length, hd/2), computed in float64 then
    rounded once (the same values whatever ``length``). ``e^(i angle)``: rotating the pair
    (x[2j], x[2j+1]) is multiplying x[2j] + i x[2j+1] by it."""
    hd = config.head_dim
    inv_freq = 1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if weights is not None and weights.rope_freqs is not None:  # Llama 3.1's per-pair factors
        inv_freq = inv_freq / weights.rope_freqs.astype(np.float64)
    positions = np.arange(length, dtype=np.float64) / scale
    angles = np.outer(positions, inv_freq)  # (context, hd/2)
    table: NDArray[np.complex64] = np.exp(1j * angles).astype(np.complex64)
    return table
