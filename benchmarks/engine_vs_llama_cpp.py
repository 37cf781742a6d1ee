"""This engine against llama.cpp's on one GGUF file: resident memory, decode at batch 1 / 8 / 32,
prefill of 256 and 1,000 tokens.

llama.cpp runs its own benchmarks on the file: ``llama-bench`` (``tg32``: batch-1 decode;
``pp256``, ``pp1000``: prefill) and ``llama-batched-bench`` (decode of 8 and 32 sequences at
once, each after a 128-token prompt), 2 threads. This engine runs ``benchmarks/engine.py`` in a
fresh process on the same file (and, with ``--baseline-src``, a second source tree of this
library: an older commit, for old against new; with ``--int8``, this engine a second time with
int8 activations, llama.cpp's arithmetic). The programs take turns, round after round, so
drift of the machine falls on all of them; medians over the rounds. Resident memory: this
engine's after load; llama.cpp's peak while it runs (it maps the file).

    python benchmarks/engine_vs_llama_cpp.py --model FILE.gguf \\
        --llama-bench PATH/llama-bench --llama-batched-bench PATH/llama-batched-bench \\
        [--baseline-src DIR] [--int8] [--rounds 3] [--batches 1,8,32]

Build both llama.cpp programs from the llama.cpp vendored in llama-cpp-python 0.3.36's source
package (see docs/benchmarks.md). Writes ``engine_vs_llama_cpp-NAME.json`` and ``.png`` into
``benchmarks/results`` (``NAME-int8`` with ``--int8``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from zigllama_batch import Activations
from zigllama_batch.generation import DEFAULT_ACTIVATIONS
from zigllama_batch.testing import cpu_name

ENGINE = Path(__file__).parent / "engine.py"
INT8 = "zigllama_batch (int8 activations)"
PREFILL = (256, 1000)


def _peak_rss_mib(command: list[str]) -> tuple[str, float]:
    """Run ``command``; its standard output and its peak resident memory in MiB (polled)."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, text=True)
        ps = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        if process.returncode:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}")
        out.seek(0)
        return out.read(), peak / 2**20


def run_llama_bench(binary: Path, model: Path, threads: int) -> dict[str, float]:
    """tg32 and pp256 / pp1000 tokens/s, and the peak resident memory."""
    prompts = ",".join(map(str, PREFILL))
    command = [str(binary), "-m", str(model), "-t", str(threads), "-p", prompts, "-n", "32"]
    text, peak = _peak_rss_mib([*command, "-r", "3", "-o", "json"])
    result = {"peak_rss_mib": peak}
    for test in json.loads(text):
        if test["n_gen"]:
            result["tg32"] = test["avg_ts"]
        else:
            result[f"pp{test['n_prompt']}"] = test["avg_ts"]
    return result


def run_batched_bench(
    binary: Path, model: Path, threads: int, batches: list[int]
) -> dict[str, float]:
    """Decode tokens/s of each batch size (all sequences' tokens a second)."""
    command = [
        str(binary),
        *("-m", str(model), "-t", str(threads), "-c", str(max(batches) * 160)),
        *("-b", "2048", "-ub", "512", "-npp", "128", "-ntg", "32"),
        *("-npl", ",".join(map(str, batches)), "--output-format", "jsonl"),
    ]
    text, _ = _peak_rss_mib(command)
    result = {}
    for line in text.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            result[f"batch{row['pl']}"] = row["speed_tg"]
    return result


def run_engine(
    model: Path,
    batches: list[int],
    steps: int,
    src: Path | None = None,
    activations: Activations = DEFAULT_ACTIVATIONS,
) -> dict[str, float]:
    """benchmarks/engine.py of a source tree (this one by default) on ``model``; this tree
    runs with ``activations`` (see ``load_model``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine.json"
        env = dict(os.environ)
        script = ENGINE
        if src is not None:
            env["PYTHONPATH"] = str(src)
            script = src / "benchmarks" / "engine.py"
        command = [
            sys.executable,
            str(script),
            *("--model", str(model), "--steps", str(steps), "--skip-memory"),
            *("--out", str(out)),
        ]
        if src is None:
            command += ["--activations", activations]
        # An older tree's engine.py may predate --batches/--prefill: it then runs its own set.
        if (
            "--batches"
            in subprocess.run(
                [sys.executable, str(script), "--help"], env=env, capture_output=True, text=True
            ).stdout
        ):
            command += ["--batches", ",".join(map(str, batches))]
            command += ["--prefill", ",".join(map(str, PREFILL))]
        subprocess.run(command, env=env, check=True, capture_output=True)
        data: dict[str, Any] = json.loads(out.read_text())
    result = {
        "load_s": data["load_s"],
        "rss_after_load_mib": data["rss_after_load_mib"],
    }
    for row in data["decode"]:
        result[f"batch{row['batch']}"] = row["tokens_per_s"]
    for row in data["prefill"]:
        result[f"pp{row['prompt_tokens']}"] = row["tokens_per_s"]
    if "bandwidth_bound_batch1" in data:
        result["bandwidth_bound_batch1"] = data["bandwidth_bound_batch1"]["tokens_per_s"]
        if "share" in data["bandwidth_bound_batch1"]:
            result["batch1_share_of_bound"] = data["bandwidth_bound_batch1"]["share"]
    if "arithmetic_bound_prefill" in data:
        result["arithmetic_bound_prefill"] = data["arithmetic_bound_prefill"]["tokens_per_s"]
    return result


def _medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rounds for k in r}
    return {k: statistics.median(r[k] for r in rounds if k in r) for k in sorted(keys)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="GGUF file")
    ap.add_argument("--llama-bench", type=Path, required=True)
    ap.add_argument("--llama-batched-bench", type=Path, required=True)
    ap.add_argument("--baseline-src", type=Path, help="another source tree of this library")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="engine decode steps per batch size")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--int8",
        action="store_true",
        help="also run this engine with int8 activations (load_model(activations='int8'))",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    runs: dict[str, list[dict[str, float]]] = {"zigllama_batch": [], "llama.cpp": []}
    if args.int8:
        runs[INT8] = []
    if args.baseline_src:
        runs["zigllama_batch (baseline)"] = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", flush=True)
        runs["zigllama_batch"].append(run_engine(args.model, batches, args.steps))
        llama = run_llama_bench(args.llama_bench, args.model, args.threads)
        llama.update(run_batched_bench(args.llama_batched_bench, args.model, args.threads, batches))
        llama["batch1"] = llama["tg32"]
        runs["llama.cpp"].append(llama)
        if args.int8:
            runs[INT8].append(run_engine(args.model, batches, args.steps, activations="int8"))
        if args.baseline_src:
            baseline = run_engine(args.model, batches, args.steps, args.baseline_src)
            runs["zigllama_batch (baseline)"].append(baseline)
    medians = {name: _medians(rounds) for name, rounds in runs.items()}

    file_mib = args.model.stat().st_size / 2**20
    ours, llama = medians["zigllama_batch"], medians["llama.cpp"]
    print(f"\n{args.model.name} ({file_mib:.0f} MiB), {args.rounds} rounds, medians")
    columns = [f"batch{b}" for b in batches] + [f"pp{n}" for n in PREFILL]
    print(f"{'':28}{'memory MiB':>11}" + "".join(f"{c:>10}" for c in columns))
    for name, m in medians.items():
        memory = m.get("rss_after_load_mib", m.get("peak_rss_mib", float("nan")))
        print(
            f"{name:28}{memory:>11.0f}"
            + "".join(f"{m.get(c, float('nan')):>10.1f}" for c in columns)
        )
    ratios = _ratios("ours / llama.cpp", ours, llama, columns)
    int8_ratios = (
        _ratios("ours int8 / llama.cpp", medians[INT8], llama, columns) if args.int8 else {}
    )
    if "bandwidth_bound_batch1" in ours:
        bound = ours["bandwidth_bound_batch1"]
        alternated = (
            f", {ours['batch1_share_of_bound']:.0%} from steps alternated with its reads"
            if "batch1_share_of_bound" in ours
            else ""
        )
        print(
            f"batch 1 at {ours['batch1'] / bound:.0%} of the same-run bandwidth bound "
            f"({bound:.1f} tokens/s){alternated}"
        )
    if "arithmetic_bound_prefill" in ours:
        bound = ours["arithmetic_bound_prefill"]
        shares = ", ".join(f"pp{n} {ours[f'pp{n}'] / bound:.0%}" for n in PREFILL)
        print(f"prefill at {shares} of the same-run arithmetic bound ({bound:.1f} tokens/s)")
    print(f"memory limit (1.15 x file + 300 MiB): {1.15 * file_mib + 300:.0f} MiB")

    name = args.model.name.removesuffix(".gguf") + ("-int8" if args.int8 else "")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model.name,
        "file_mib": file_mib,
        "machine": {
            "cpu": cpu_name(),
            "threads": args.threads,
            "python": platform.python_version(),
        },
        "rounds": runs,
        "medians": medians,
        "ours_over_llama_cpp": ratios,
        "ours_int8_over_llama_cpp": int8_ratios,
    }
    path = args.out / f"engine_vs_llama_cpp-{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    _plot(medians, columns, args.out / f"engine_vs_llama_cpp-{name}.png", args.model.name)
    print(f"wrote {path}")


def _ratios(
    label: str, ours: dict[str, float], llama: dict[str, float], columns: list[str]
) -> dict[str, float]:
    """``ours`` over llama.cpp's figures, column by column, printed as a row of the table."""
    ratios = {c: ours[c] / llama[c] for c in columns if c in ours and c in llama}
    print(f"{label:28}{'':>11}" + "".join(f"{ratios.get(c, float('nan')):>10.2f}" for c in columns))
    return ratios


def _plot(medians: dict[str, dict[str, float]], columns: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(medians)
    for i, (name, m) in enumerate(medians.items()):
        xs = [c + i * width for c in range(len(columns))]
        ax.bar(xs, [m.get(c, 0.0) for c in columns], width, label=name)
    ax.set_xticks([c + width * (len(medians) - 1) / 2 for c in range(len(columns))])
    ax.set_xticklabels(columns)
    ax.set_ylabel("tokens/s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
