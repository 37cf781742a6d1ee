"""What a verified row costs: one sequence's step with 1 to 8 rows (its token and 0 to 7
drafted tokens to verify), and the speed-up speculative decoding could reach at most.

A step of ``1 + d`` rows at a 200-token context, medians of 30 steps, 5 rounds (median of the
rounds). With every draft of ``d`` tokens accepted, a step gives ``d + 1`` tokens, so the
best speed-up over one-row steps is ``(d + 1) * t(1) / t(1 + d)``; partial acceptance gives
less. Printed as a table; JSON in ``benchmarks/results/verify_rows-NAME.json``.

    python benchmarks/verify_rows.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import get_args

from zigllama_batch import Activations, load_model
from zigllama_batch.engine import SequenceStep
from zigllama_batch.generation import DEFAULT_ACTIVATIONS
from zigllama_batch.testing import cpu_name

ROWS = (1, 2, 3, 4, 5, 7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or packaged model name")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--activations",
        choices=get_args(Activations),
        default=DEFAULT_ACTIVATIONS,
        help="what the quantized layers multiply (see load_model)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    model, _ = load_model(args.model, activations=args.activations)
    cache = model.new_cache(1, 1024)
    prompt = list(range(200, 400))
    model.step([SequenceStep(0, prompt, 0)], cache)
    times: dict[int, list[float]] = {rows: [] for rows in ROWS}
    for _ in range(args.rounds):
        for rows in ROWS:
            steps = []
            for i in range(30):
                ids = [prompt[(i + j) % len(prompt)] for j in range(rows)]
                started = time.perf_counter()
                model.step([SequenceStep(0, ids, len(prompt), draft=rows - 1)], cache)
                steps.append(time.perf_counter() - started)
            times[rows].append(statistics.median(steps) * 1000)
    ms = {rows: statistics.median(v) for rows, v in times.items()}
    table = [
        {
            "rows": rows,
            "step_ms": ms[rows],
            "extra_row_share_of_step": (ms[rows] - ms[1]) / (rows - 1) / ms[1] if rows > 1 else 0.0,
            "best_speedup_all_accepted": rows * ms[1] / ms[rows],
        }
        for rows in ROWS
    ]
    print(
        f"{model.config.name}, {args.activations} activations, one sequence at 200 positions, "
        f"medians of {args.rounds} rounds"
    )
    print(f"{'rows':>4} {'step ms':>8} {'row / step':>10} {'best speed-up':>14}")
    for r in table:
        print(
            f"{r['rows']:>4} {r['step_ms']:>8.2f} {r['extra_row_share_of_step']:>10.2f} "
            f"{r['best_speedup_all_accepted']:>13.2f}x"
        )
    result = {
        "model": model.config.name,
        "machine": {"cpu": cpu_name(), "python": platform.python_version()},
        "rounds": args.rounds,
        "activations": args.activations,
        "rows": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.activations == "float32" else f"-{args.activations}"
    path = args.out / f"verify_rows-{model.config.name}{suffix}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
