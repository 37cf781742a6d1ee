#!/usr/bin/env python3
"""Reference logits for the tiny qwen2, qwen3 and gemma3 files, from Hugging Face transformers.

Writes ``families_reference.npz`` next to itself. For each family of ``tests/tiny_gguf.py``'s
``FAMILY_SPECS`` the file the tests write is loaded by transformers (``from_pretrained(...,
gguf_file=...)``, float32, CPU), an independent implementation of each architecture, and run on:

* ``{family}_ids`` int64 (40,): token ids, teacher forced in one forward pass;
  ``{family}_logits`` float32 (40, vocab): the logits at every position.
* ``{family}_prompt`` int64 (12,) and ``{family}_greedy`` int64 (16,): greedy continuation,
  each step a full forward pass over prompt + tokens so far (no cache).
* ``{family}_digest``: sha256 of the file's dequantized tensors, so a test can tell a changed
  fixture writer from a wrong forward pass.

Plus ``meta``: JSON of versions and specs. Environment (outside the project's dependencies)::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers gguf accelerate numpy

Rerun from the repository root (seconds)::

    /tmp/refvenv/bin/python tests/engine/reference/make_family_reference.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/, for tiny_gguf

from tiny_gguf import FAMILY_SPECS, weights_digest, write_tiny_gguf  # noqa: E402

N_TEACHER = 40
N_PROMPT = 12
N_GREEDY = 16


def main() -> None:
    import gguf
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    out: dict[str, np.ndarray] = {}
    meta: dict[str, object] = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", "?"),
            "numpy": np.__version__,
        },
        "specs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for family, spec in FAMILY_SPECS.items():
            path = write_tiny_gguf(Path(tmp) / f"{family}.gguf", spec)
            model = AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=path.name, dtype=torch.float32
            ).eval()
            vocab = model.config.vocab_size
            rng = np.random.default_rng(100)
            ids = rng.integers(0, vocab, N_TEACHER).astype(np.int64)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(ids[None]), use_cache=False).logits[0]
                seq = list(rng.integers(0, vocab, N_PROMPT))
                prompt = list(seq)
                for _ in range(N_GREEDY):
                    step = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                    seq.append(int(step.argmax()))
            out[f"{family}_ids"] = ids
            out[f"{family}_logits"] = logits.numpy().astype(np.float32)
            out[f"{family}_prompt"] = np.asarray(prompt, np.int64)
            out[f"{family}_greedy"] = np.asarray(seq[N_PROMPT:], np.int64)
            out[f"{family}_digest"] = np.asarray(weights_digest(path))
            spec_dict = dataclasses.asdict(spec)
            spec_dict["qtypes"] = {k: v.name for k, v in spec.qtypes.items()}
            meta["specs"][family] = {  # type: ignore[index]
                "spec": spec_dict,
                "hf_config": model.config.to_dict(),
            }
            print(family, model.config.model_type, "logits", logits.shape, "greedy", seq[N_PROMPT:])
    out["meta"] = np.asarray(json.dumps(meta, default=str))
    np.savez_compressed(HERE / "families_reference.npz", **out)
    print("wrote", HERE / "families_reference.npz")


if __name__ == "__main__":
    main()
