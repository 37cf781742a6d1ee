"""What differs between the Llama-family architectures the engine runs, as one table of facts.

Inside: :class:`Architecture` (one row: biases, q/k norms, RoPE pair layout, norm layout,
activation, embedding scale, attention windows) and :data:`ARCHITECTURES`, keyed by GGUF's
``general.architecture``. The loader reads a row to know which tensors to expect and how to lay
them out; the forward pass reads it (through the weights and config) and has no branch on an
architecture's name.

Sources, checked against each other: llama.cpp's ``src/llama-model.cpp`` and ``src/models/*.cpp``
(what a GGUF file holds and how llama.cpp runs it), and transformers' ``modeling_qwen2.py``,
``modeling_qwen3.py`` and ``modeling_gemma3.py`` (the reference the tests compare against).

Left out: partial rotary dimensions (Phi), mixture-of-experts, logit soft-capping (Gemma 2),
attention sinks, and every architecture not in the table; a GGUF of one is refused at load.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ARCHITECTURES", "Activation", "Architecture", "RopeLayout", "architecture"]


class RopeLayout(enum.Enum):
    """Which dimensions of a head RoPE rotates together (llama.cpp's rope types)."""

    ADJACENT = "adjacent"
    """Pairs ``(2i, 2i + 1)``: llama.cpp's NORM, for ``llama`` files, whose converter permuted
    the Q and K rows into this order."""
    HALVES = "halves"
    """Pairs ``(i, i + head_dim / 2)``: llama.cpp's NEOX, transformers' ``rotate_half`` on
    weights the converter left as they were. A file run with the wrong layout loads and talks
    nonsense, so the layout is a fact of the architecture, never guessed."""


class Activation(enum.Enum):
    """The gated feed-forward's activation: ``down(act(gate(h)) * up(h))``."""

    SILU = "silu"
    """SwiGLU (Llama, Qwen)."""
    GELU_TANH = "gelu_tanh"
    """GeGLU with the tanh approximation of GELU (Gemma)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    """The facts of one architecture that the loader and the forward pass act on."""

    name: str
    """``general.architecture`` in the GGUF file; also the prefix of its metadata keys."""
    rope_layout: RopeLayout
    """Which dimensions RoPE pairs (see :class:`RopeLayout`)."""
    qkv_bias: bool = False
    """The Q, K and V projections carry biases (Qwen2)."""
    qk_norm: bool = False
    """Queries and keys get a per-head RMSNorm before RoPE (Qwen3, Gemma 3)."""
    sandwich_norms: bool = False
    """The attention and feed-forward outputs are RMS-normed again before each residual add
    (Gemma 3's ``post_attention_norm`` and ``post_ffw_norm``)."""
    activation: Activation = Activation.SILU
    """The feed-forward's gate activation."""
    scale_embeddings: bool = False
    """Token embeddings are multiplied by ``sqrt(dim)`` on the way in (Gemma), not on the way
    out through a tied head."""
    global_every: int | None = None
    """When set, one layer in this many (the last of each group) attends to every position and
    the others only to the last ``attention.sliding_window`` positions (Gemma 3: 5 local layers,
    then 1 global)."""
    local_rope_base: float | None = None
    """RoPE base of the windowed layers, which GGUF files do not store (Gemma 3: 10,000, where
    its global layers read 1,000,000 from the file); None: every layer uses the file's."""
    wide_query_scale_layers: int | None = None
    """A model of this many layers scales its queries by ``1/sqrt(dim / heads)`` instead of
    ``1/sqrt(head_dim)`` (Gemma 3 27B, 62 layers, as llama.cpp and its Hugging Face config's
    ``query_pre_attn_scalar`` of 168 say; GGUF files do not store the scalar)."""

    def is_global(self, layer: int) -> bool:
        """True when ``layer`` attends to every earlier position."""
        return self.global_every is None or (layer + 1) % self.global_every == 0


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(name="llama", rope_layout=RopeLayout.ADJACENT),
        Architecture(name="qwen2", rope_layout=RopeLayout.HALVES, qkv_bias=True),
        Architecture(name="qwen3", rope_layout=RopeLayout.HALVES, qk_norm=True),
        Architecture(
            name="gemma3",
            rope_layout=RopeLayout.HALVES,
            qk_norm=True,
            sandwich_norms=True,
            activation=Activation.GELU_TANH,
            scale_embeddings=True,
            global_every=6,
            local_rope_base=10_000.0,
            wide_query_scale_layers=62,
        ),
    )
}
"""Every architecture the engine runs, by ``general.architecture``. Norm weights are used as
the GGUF file stores them: for Gemma, llama.cpp's converter already added the 1 of
``(1 + w)`` (transformers subtracts it again when it reads a GGUF)."""


def architecture(name: object) -> Architecture:
    """The table's row for ``name``.

    Raises:
        KeyError: ``name`` is not in :data:`ARCHITECTURES`; the message lists those that are.
    """
    row = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if row is None:
        raise KeyError(
            f"architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return row
