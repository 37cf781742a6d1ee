"""The quantized kernels per block type and row count: which one to run for how many rows.

For each type, a matrix of the 1B model's FFN shape (8192 x 2048, four copies cycled so the
weights come from memory, not cache) is multiplied by 1, 2, 3, 4, 8, 12, 16, 32, 48, 64 and 256
activation rows with both products: the few-row kernel the type uses (``gemv_registers`` for
Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, ``gemv_fused`` for the others; at one row of Q4_0 and Q4_1
``gemv_nibbles``: ``few_rows_product``) and the tiled BLAS one. Reported: the median
milliseconds of each, billions of weight values a second, GB/s of weight bytes read, and where
the faster one changes; ``GEMV_MAX_ROWS`` in ``zigllama_batch/engine/kernels`` comes from this
table.

    python benchmarks/kernels.py [--types q8_0,q4_0,...] [--repeats 12]

Writes ``benchmarks/results/kernels.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from zigllama_batch.engine.kernels import GEMV_MAX_ROWS, Linear, Weight, few_rows_product
from zigllama_batch.engine.kernels.blocks import FORMATS
from zigllama_batch.engine.kernels.matmul import gemm
from zigllama_batch.testing import cpu_name

ROWS = (1, 2, 3, 4, 8, 12, 16, 32, 48, 64, 256)
SHAPE = (8192, 2048)
COPIES = 4
_SCALES = {Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
"""Where each type's float16 scale (and minimum) fields sit in a block."""


def random_weight(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> Weight:
    """A weight of random blocks (small finite float16 scales)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in _SCALES.get(qtype, (0,)):
        raw[..., offset : offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return Linear.of(Weight.from_gguf(raw.reshape(rows, -1), qtype, rows, cols)).parts[0]


def measure(qtype: Q, repeats: int) -> list[dict[str, float]]:
    rows, cols = SHAPE
    rng = np.random.default_rng(0)
    weights = [random_weight(qtype, rows, cols, rng) for _ in range(COPIES)]
    nbytes = weights[0].nbytes
    results = []
    for n in ROWS:
        x = rng.standard_normal((n, cols)).astype(np.float32)
        out = np.empty((n, rows), np.float32)

        def gemv(w: Weight, x: np.ndarray, out: np.ndarray) -> None:
            few_rows_product(x, w, out)

        def tiled(w: Weight, x: np.ndarray, out: np.ndarray) -> None:
            t = w.tiles
            assert t is not None
            gemm(t.code, t.block, *t.arrays, x, out)

        times: dict[str, list[float]] = {"gemv": [], "tiled": []}
        gemv(weights[0], x, out)
        tiled(weights[0], x, out)
        for r in range(repeats):  # the two alternate; each repeat on the next copy
            for name, kernel in (("gemv", gemv), ("tiled", tiled)):
                t0 = time.perf_counter()
                kernel(weights[r % COPIES], x, out)
                times[name].append(time.perf_counter() - t0)
        row: dict[str, float] = {"rows": n}
        for name, ts in times.items():
            t = statistics.median(ts)
            row[f"{name}_ms"] = t * 1e3
            row[f"{name}_gvalues_per_s"] = rows * cols / t / 1e9
            row[f"{name}_gb_per_s"] = nbytes / t / 1e9
        results.append(row)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [t.name.lower() for t in FORMATS if t not in (Q.F16, Q.BF16)]
    ap.add_argument("--types", default=",".join(names))
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = ap.parse_args()
    report = {}
    print(f"{SHAPE[0]} x {SHAPE[1]} weights, medians of {args.repeats}; ms gemv / tiled")
    for name in args.types.split(","):
        qtype = Q[name.upper()]
        rows = measure(qtype, args.repeats)
        report[qtype.name] = rows
        cells = "  ".join(f"{int(r['rows'])}: {r['gemv_ms']:.2f}/{r['tiled_ms']:.2f}" for r in rows)
        faster = [int(r["rows"]) for r in rows if r["gemv_ms"] <= r["tiled_ms"]]
        one = rows[0]
        print(
            f"{qtype.name:5} {cells}\n      1 row: {one['gemv_gvalues_per_s']:.1f} Gvalues/s, "
            f"{one['gemv_gb_per_s']:.1f} GB/s; gemv faster at {faster}; "
            f"GEMV_MAX_ROWS = {GEMV_MAX_ROWS[qtype]}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_name(), "python": platform.python_version(), "numpy": np.__version__}
    args.out.write_text(
        json.dumps({"machine": machine, "shape": SHAPE, "types": report}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
