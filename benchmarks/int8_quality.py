"""What int8 activations cost in quality: the same model loaded twice, exact
(``activations="float32"``) and with int8 activations, on the same text and prompts.

Teacher-forced over windows of text (by default this repository's README and docs): each
model's perplexity, the mean KL divergence of the int8 model's next-token distribution from the
exact one's (llama.cpp's ``llama-perplexity --kl-divergence`` measures the same), how often
their top tokens agree, and the largest logit difference relative to the logits' spread. Then
greedy generations of a few chat prompts: how many tokens match before the first difference.

    python benchmarks/int8_quality.py [--model PATH|NAME] [--windows 8] [--window 512]

Writes ``benchmarks/results/int8_quality-NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from zigllama_batch import GenerationConfig, TextGenerator, load_model
from zigllama_batch.engine import SequenceStep
from zigllama_batch.testing import cpu_name

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France? Explain in two sentences.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give three tips for writing clear emails.",
    "Summarise the water cycle for a ten-year-old.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "List the planets of the solar system in order from the sun.",
]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z: np.ndarray = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return out


def teacher_forced(model: Any, tokens: list[int]) -> np.ndarray:
    """Log-probabilities (len - 1, vocab) of each next token of ``tokens``, one step."""
    cache = model.new_cache(1, len(tokens) + 1)
    logits = model.step([SequenceStep(0, tokens, 0, draft=len(tokens) - 1)], cache)
    return log_softmax(logits[:-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or packaged model name")
    ap.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    exact, tokenizer = load_model(args.model, progress=False)
    int8, _ = load_model(args.model, progress=False, activations="int8")
    text = "\n\n".join(
        p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    )
    ids = tokenizer.encode(text)
    n = min(args.windows, len(ids) // args.window)
    nll = {"float32": 0.0, "int8": 0.0}
    kl, agree, count, worst = 0.0, 0, 0, 0.0
    for w in range(n):
        tokens = ids[w * args.window : (w + 1) * args.window]
        a, b = teacher_forced(exact, tokens), teacher_forced(int8, tokens)
        target = np.array(tokens[1:])
        rows = np.arange(len(target))
        nll["float32"] -= float(a[rows, target].sum())
        nll["int8"] -= float(b[rows, target].sum())
        kl += float((np.exp(a) * (a - b)).sum())
        agree += int((a.argmax(axis=1) == b.argmax(axis=1)).sum())
        count += len(target)
        spread = (a.max(axis=1) - a.min(axis=1)).mean()
        worst = max(
            worst,
            float(
                np.abs(
                    (a - a.max(axis=1, keepdims=True)) - (b - b.max(axis=1, keepdims=True))
                ).max()
                / spread
            ),
        )
    perplexity = {k: float(np.exp(v / count)) for k, v in nll.items()}

    config = GenerationConfig.greedy(max_tokens=args.max_tokens)
    runs: list[dict[str, Any]] = []
    for prompt in PROMPTS:
        message = [{"role": "user", "content": prompt}]
        outs = []
        for model in (exact, int8):
            started = time.perf_counter()
            generated = TextGenerator(model, tokenizer).generate(message, config)
            outs.append((generated.token_ids, time.perf_counter() - started))
        (ta, _), (tb, _) = outs
        same = next(
            (i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y),
            min(len(ta), len(tb)),
        )
        runs.append(
            {"prompt": prompt, "tokens": len(ta), "identical_prefix": same, "identical": ta == tb}
        )

    print(f"{exact!r}: {count} tokens teacher-forced in {n} windows of {args.window}")
    print(
        f"  perplexity      float32 {perplexity['float32']:.4f}   int8 {perplexity['int8']:.4f}"
        f"   ({perplexity['int8'] / perplexity['float32'] - 1:+.2%})"
    )
    print(f"  mean KL divergence  {kl / count:.2e} nats a token")
    print(f"  same top token      {agree / count:.2%}")
    print(f"  largest log-prob difference / mean spread  {worst:.3f}")
    print(f"greedy, {len(PROMPTS)} chat prompts, {args.max_tokens} tokens:")
    for r in runs:
        print(
            f"  {r['identical_prefix']:3d}/{r['tokens']:<3d} tokens identical  {r['prompt'][:50]}"
        )
    result = {
        "model": repr(exact),
        "machine": {"cpu": cpu_name()},
        "tokens": count,
        "window": args.window,
        "perplexity": perplexity,
        "mean_kl_nats": kl / count,
        "top1_agreement": agree / count,
        "max_logprob_difference_over_spread": worst,
        "greedy": runs,
    }
    name = exact.config.name
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"int8_quality-{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
