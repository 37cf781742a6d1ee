"""The output head in one layout or two: decode steps with either, alternated in one run.

"one layout": every step multiplies its final hidden states by the (dim, vocab) head, ``h @ W``
(for up to 3 rows as matrix-vector products). "two layouts" (the engine's): steps of more than
3 rows multiply the (vocab, dim) rows by ``h^T`` in blocks of vocabulary rows instead. Decode
steps of batch 1 and 32 run alternately with each head, and the bare head products of 1 to 64
rows are timed the same way.

    python benchmarks/output_head.py [--model gemma-3-270m] [--rounds 8] [--out benchmarks/results]

Writes ``output_head-MODEL.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import engine as engine_bench  # this directory's engine benchmark: its decoding loop

import zigllama_batch.engine.model as model_module
from zigllama_batch import load_model
from zigllama_batch.engine import Engine
from zigllama_batch.engine.gguf_loader import F32, LlamaWeights

TWO_LAYOUTS = model_module.output_head


def one_layout(h: F32, weights: LlamaWeights) -> F32:
    """The head as before: ``h @ W`` over (dim, vocab) for any number of rows."""
    return model_module._matmul(h, weights.output)


HEADS: dict[str, Callable[[F32, LlamaWeights], F32]] = {
    "one layout": one_layout,
    "two layouts": TWO_LAYOUTS,
}


def cpu_name() -> str:
    """lscpu's model name (the CPU changes between sessions of this project's machine)."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")]
    return names[0] if names else platform.processor()


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    model, tokenizer = load_model(args.model, progress=False)
    weights = model.weights
    print(f"model: {model!r}")
    rng = np.random.default_rng(0)

    products: dict[tuple[str, int], list[float]] = {}
    rows = (1, 2, 4, 8, 16, 32, 64)
    for _ in range(args.rounds):
        for n in rows:
            h = rng.standard_normal((n, model.config.dim)).astype(np.float32)
            for name, head in HEADS.items():
                began = time.perf_counter()
                head(h, weights)
                products.setdefault((name, n), []).append(time.perf_counter() - began)

    engine = Engine(model, tokenizer, n_slots=33, max_context=1024)
    groups = {
        1: engine_bench._Decoding(engine, [32], rng),
        32: engine_bench._Decoding(engine, list(range(32)), rng),
    }
    steps: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(args.rounds):
            order = list(HEADS.items()) if r % 2 == 0 else list(HEADS.items())[::-1]
            for name, head in order:
                # The step looks the head up at each call: swap it for the A/B.
                model_module.output_head = head  # type: ignore[assignment]
                for batch, decoding in groups.items():
                    steps.setdefault((name, batch), []).append(decoding.step())
    finally:
        model_module.output_head = TWO_LAYOUTS

    print("\nhead product ms (median)   " + "".join(f"{n:>8} rows" for n in rows))
    for name in HEADS:
        cells = "".join(f"{median_ms(products[(name, n)]):13.1f}" for n in rows)
        print(f"  {name:<24}{cells}")
    print("\ndecode step ms (median)    batch 1   batch 32   batch 32 over batch 1")
    result: dict[str, Any] = {}
    for name in HEADS:
        one, many = median_ms(steps[(name, 1)]), median_ms(steps[(name, 32)])
        print(f"  {name:<24}{one:9.1f}{many:11.1f}{32 * one / many:14.2f}x")
        result[name] = {
            "batch1_step_ms": one,
            "batch32_step_ms": many,
            "gain": 32 * one / many,
            "head_ms_by_rows": {n: median_ms(products[(name, n)]) for n in rows},
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"output_head-{args.model}.json"
    payload = {
        "model": repr(model),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "python": platform.python_version(),
        "rounds": args.rounds,
        "heads": result,
        "measured_at": time.strftime("%Y-%m-%d"),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
