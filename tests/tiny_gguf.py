"""Tiny GGUF files written with ``gguf.GGUFWriter``, for fast engine and processor tests.

The weights are drawn in Hugging Face's layout and written the way llama.cpp's converter writes
them: for ``llama``, Q and K rows permuted for adjacent-pair RoPE, so a test can check the engine
against an independent forward pass on the un-permuted weights (:func:`reference_logits`); for
``qwen2``, ``qwen3`` and ``gemma3``, as they are, with the tensors each family adds (Q/K/V
biases, q/k norms, Gemma's sandwich norms) and the metadata transformers needs to load the same
file as the reference (:data:`FAMILY_SPECS`; ``tests/engine/reference/make_family_reference.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from zigllama_batch import LLaMAModel
from zigllama_batch.engine import SequenceStep

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [
    "Ġ t",
    "h e",
    "Ġ a",
    "i n",
    "Ġt he",
    "e r",
    "o n",
    "Ġ s",
    "r e",
    "a n",
    "Ġ w",
    "o r",
    "Ġ c",
    "e n",
    "Ġ b",
    "e s",
    "Ġ o",
    "a t",
    "i s",
    "Ġ f",
    "Ġ m",
    "e d",
    "Ġ p",
    "Ġa n",
    "in g",
    "Ġ d",
    "Ġt o",
    "Ġo f",
    "Ġan d",
    "l l",
    "Ġ h",
    "Ġ i",
    "o u",
    "Ġs he",
]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map (written independently of the library's copy)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE vocabulary."""
    tokens = list(SPECIALS) + [bytes_to_unicode()[b] for b in range(256)]
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, list(MERGES)


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores) of a small SentencePiece-style vocabulary with byte tokens."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "▁h",
        "he",
        "ll",
        "▁he",
        "llo",
        "▁hello",
        "▁w",
        "or",
        "▁wor",
        "ld",
        "▁world",
        "a",
        "t",
        "▁t",
        "▁a",
        "at",
        "▁at",
    ]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


@dataclass(frozen=True)
class TinySpec:
    """Shape and contents of a tiny model file."""

    n_layers: int = 2
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 256
    context_length: int = 256
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    tied: bool = True
    vocab: str = "gpt2"  # or "spm"
    qtypes: dict[str, Q] = field(default_factory=dict)  # tensor name suffix -> type
    seed: int = 0
    arch: str = "llama"
    drop_tensors: Sequence[str] = ()
    drop_keys: Sequence[str] = ()
    chat_template: str | None = CHATML
    add_bos: bool | None = None
    head_dim: int | None = None  # written as attention.key_length when set
    sliding_window: int | None = None  # gemma3's attention.sliding_window
    tokenizer_pre: str = "smollm"  # tokenizer.ggml.pre of a gpt2 vocabulary
    embed_scale: float = 1.0  # spread of the token embedding (smaller: layers matter more)
    rope_freqs: bool = False  # write Llama 3.1's per-pair RoPE frequency factors

    @property
    def hd(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.dim // self.n_heads


FAMILY_SPECS: dict[str, TinySpec] = {
    # Qwen2: Q/K/V biases, NEOX RoPE, tied head, RoPE base 1e6.
    "qwen2": TinySpec(
        arch="qwen2",
        n_heads=4,
        n_kv_heads=2,
        rope_base=1e6,
        rms_eps=1e-6,
        seed=11,
        tokenizer_pre="qwen2",
        n_layers=3,
        embed_scale=0.1,
    ),
    # Qwen3: per-head q/k RMSNorm, heads wider than dim / heads (transformers' Qwen3 reads no
    # key_length from a GGUF and keeps its default of 128, so the file states 128 too).
    "qwen3": TinySpec(
        arch="qwen3",
        n_heads=4,
        n_kv_heads=2,
        head_dim=128,
        rope_base=1e6,
        rms_eps=1e-6,
        seed=12,
        tied=False,
        tokenizer_pre="qwen2",
        n_layers=3,
    ),
    # Gemma 3: 5 windowed layers then a global one, a window shorter than the test prompts,
    # head width 256 (transformers scales queries by its query_pre_attn_scalar default, 256;
    # llama.cpp by 1/sqrt(key_length): the same here and in Gemma 3 270M).
    "gemma3": TinySpec(
        arch="gemma3",
        n_heads=2,
        n_kv_heads=1,
        head_dim=256,
        rope_base=1e6,
        rms_eps=1e-6,
        seed=13,
        sliding_window=8,
        n_layers=6,
        vocab="spm",
        context_length=512,
        embed_scale=0.1,
    ),
}
"""One tiny spec per family beyond llama; their files load in transformers as well."""


def hf_weights(spec: TinySpec, vocab_size: int) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face's layout: linear layers as (out, in)."""
    rng = np.random.default_rng(spec.seed)
    hd = spec.hd

    def w(*shape: int, scale: float = 0.15) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1 + w(n, scale=0.1)).astype(np.float32)

    out = {"token_embd.weight": w(vocab_size, spec.dim, scale=spec.embed_scale)}
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = norm(spec.dim)
        out[p + "attn_q.weight"] = w(spec.n_heads * hd, spec.dim)
        out[p + "attn_k.weight"] = w(spec.n_kv_heads * hd, spec.dim)
        out[p + "attn_v.weight"] = w(spec.n_kv_heads * hd, spec.dim)
        out[p + "attn_output.weight"] = w(spec.dim, spec.n_heads * hd)
        out[p + "ffn_norm.weight"] = norm(spec.dim)
        out[p + "ffn_gate.weight"] = w(spec.ffn_dim, spec.dim)
        out[p + "ffn_up.weight"] = w(spec.ffn_dim, spec.dim)
        out[p + "ffn_down.weight"] = w(spec.dim, spec.ffn_dim, scale=0.08)
        if spec.arch == "qwen2":
            out[p + "attn_q.bias"] = w(spec.n_heads * hd, scale=0.5)
            out[p + "attn_k.bias"] = w(spec.n_kv_heads * hd, scale=0.5)
            out[p + "attn_v.bias"] = w(spec.n_kv_heads * hd, scale=0.5)
        if spec.arch in ("qwen3", "gemma3"):
            out[p + "attn_q_norm.weight"] = norm(hd)
            out[p + "attn_k_norm.weight"] = norm(hd)
        if spec.arch == "gemma3":
            out[p + "post_attention_norm.weight"] = norm(spec.dim)
            out[p + "post_ffw_norm.weight"] = norm(spec.dim)
    out["output_norm.weight"] = norm(spec.dim)
    if spec.rope_freqs:  # Llama 3.1 divides the low frequencies by up to its factor of 8
        out["rope_freqs.weight"] = rng.uniform(1.0, 8.0, hd // 2).astype(np.float32)
    if not spec.tied:
        out["output.weight"] = w(vocab_size, spec.dim, scale=0.5)
    return out


def permute_for_gguf(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute: rows reordered for adjacent-pair RoPE."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute_from_gguf(weights: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' reverse permutation (back to rotate-half layout)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def write_tiny_gguf(path: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny Llama GGUF file and return its path."""
    writer = gguf.GGUFWriter(str(path), spec.arch)
    keys: dict[str, object] = {
        "block_count": spec.n_layers,
        "context_length": spec.context_length,
        "embedding_length": spec.dim,
        "feed_forward_length": spec.ffn_dim,
        "head_count": spec.n_heads,
        "head_count_kv": spec.n_kv_heads,
        "rope_freq_base": spec.rope_base,
        "layer_norm_rms_eps": spec.rms_eps,
    }
    if spec.head_dim is not None:
        keys["key_length"] = keys["value_length"] = spec.head_dim
    if spec.sliding_window is not None:
        keys["sliding_window"] = spec.sliding_window
    for key, value in keys.items():
        if key not in spec.drop_keys:
            getattr(writer, f"add_{key}")(value)
    writer.add_name(f"tiny-test-{spec.arch}")
    if spec.vocab == "gpt2":
        tokens, types, merges = gpt2_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(spec.tokenizer_pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    else:
        tokens, types, scores = spm_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores(scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    if spec.add_bos is not None:
        writer.add_add_bos_token(spec.add_bos)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)

    for name, w in hf_weights(spec, len(tokens)).items():
        if name in spec.drop_tensors:
            continue
        if spec.arch == "llama" and name.endswith("attn_q.weight"):
            w = permute_for_gguf(w, spec.n_heads)
        elif spec.arch == "llama" and name.endswith("attn_k.weight"):
            w = permute_for_gguf(w, spec.n_kv_heads)
        qtype = next((t for suffix, t in spec.qtypes.items() if name.endswith(suffix)), Q.F32)
        if w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, w)
        elif qtype in K_QUANTS:
            writer.add_tensor(name, random_k_quant(w.shape, qtype, spec.seed), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def random_k_quant(shape: tuple[int, ...], qtype: Q, seed: int) -> np.ndarray:
    """Raw blocks of a K-quant type (gguf cannot quantize to them). Every byte is below 0x40,
    so each float16 scale inside a block is finite and small."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    return rng.integers(0, 0x40, size=(rows, cols // block * size), dtype=np.uint8)


def file_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized with the gguf package, numpy (rows, cols) order."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}


def weights_digest(path: Path) -> str:
    """sha256 over a file's tensors, dequantized, in name order: what a reference was made from."""
    h = hashlib.sha256()
    for name, array in sorted(file_tensors(path).items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return h.hexdigest()


def greedy_tokens(model: LLaMAModel, prompt: Sequence[int], n: int, context: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` (fed as one step), decoded through a KV cache of
    ``context`` positions."""
    cache = model.new_cache(1, context)
    logits = model.step([SequenceStep(0, list(prompt), 0)], cache)[0]
    tokens: list[int] = []
    for i in range(n):
        tokens.append(int(np.argmax(logits)))
        logits = model.step([SequenceStep(0, [tokens[-1]], len(prompt) + i)], cache)[0]
    return tokens


def reference_logits(path: Path, spec: TinySpec, token_ids: Sequence[int]) -> np.ndarray:
    """Logits at every position, by an independent float64 forward pass in Hugging Face's form
    (un-permuted Q/K, rotate-half RoPE, full causal attention, no cache)."""
    t = {k: v.astype(np.float64) for k, v in file_tensors(path).items()}
    hd = spec.dim // spec.n_heads
    n = len(token_ids)
    x = t["token_embd.weight"][list(token_ids)]

    def rms(v: np.ndarray, w: np.ndarray) -> np.ndarray:
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + spec.rms_eps) * w

    inv = 1.0 / spec.rope_base ** (np.arange(0, hd, 2) / hd)
    if "rope_freqs.weight" in t:
        inv = inv / t["rope_freqs.weight"]
    ang = np.outer(np.arange(n), inv)
    cos = np.cos(np.concatenate([ang, ang], -1))
    sin = np.sin(np.concatenate([ang, ang], -1))

    def rotate_half(v: np.ndarray) -> np.ndarray:
        return np.concatenate([-v[..., hd // 2 :], v[..., : hd // 2]], -1)

    for i in range(spec.n_layers):
        p = f"blk.{i}."
        h = rms(x, t[p + "attn_norm.weight"])
        wq = unpermute_from_gguf(t[p + "attn_q.weight"], spec.n_heads)
        wk = unpermute_from_gguf(t[p + "attn_k.weight"], spec.n_kv_heads)
        q = (h @ wq.T).reshape(n, spec.n_heads, hd).transpose(1, 0, 2)
        k = (h @ wk.T).reshape(n, spec.n_kv_heads, hd).transpose(1, 0, 2)
        v = (h @ t[p + "attn_v.weight"].T).reshape(n, spec.n_kv_heads, hd).transpose(1, 0, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = spec.n_heads // spec.n_kv_heads
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        s = s + np.triu(np.full((n, n), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(n, -1)
        x = x + a @ t[p + "attn_output.weight"].T
        h = rms(x, t[p + "ffn_norm.weight"])
        g = h @ t[p + "ffn_gate.weight"].T
        u = h @ t[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "ffn_down.weight"].T
    x = rms(x, t["output_norm.weight"])
    head = t.get("output.weight", t["token_embd.weight"])
    return x @ head.T
