"""Engine speed on a model: load time, resident memory, prefill and decode throughput.

Decode steps are timed A/B interleaved with the bare weight products of the same step (the
engine's own kernels, same shapes, same weights): their ratio, the engine's share of the
matrix-multiply bound, holds on a noisy machine where absolute figures drift. The batching gain
(tokens/s at batch 32 over batch 1) is measured the same way, from batch-1 and batch-32 steps
alternated. Batch 1 is also set beside a memory-bandwidth bound: float32 matrix-vector products
over as many bytes as the model's weights, the time any kernel needs to read them once (its
share from batch-1 steps alternated with those reads, too); prefill beside an arithmetic bound:
a prompt token's multiply-adds at the rate numpy's BLAS multiplies large float32 matrices,
which no kernel multiplying float32 activations by the weights' exact values exceeds (a float32
engine included). Medians everywhere.

    python benchmarks/engine.py [--model PATH|NAME] [--steps 32] [--batches 1,8,32,64] [--out FILE]

Results go to ``benchmarks/results/engine.json`` for the default model and to
``engine-NAME.json`` for a model given by name or path (``--model gemma-3-270m``:
``engine-gemma-3-270m.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, get_args

import numpy as np

from zigllama_batch import Activations, GenerationConfig, load_model
from zigllama_batch.engine import Engine, LLaMAModel, SequenceStep, TokenSample
from zigllama_batch.engine.hub import model_path
from zigllama_batch.engine.kernels import linear
from zigllama_batch.generation import DEFAULT_ACTIVATIONS

BATCHES = (1, 8, 32, 64)
PREFILL_LENGTHS = (16, 256, 1000)
ALONE_SLOT = 40
"""The batch-1 sequence's slot in the alternated batching-gain measure: apart from the 32."""


def bare_matmuls(model: LLaMAModel, batch: int, scratch: dict[int, Any]) -> None:
    """The weight products of one decode step of ``batch`` tokens, and nothing else."""
    if batch not in scratch:
        c = model.config
        scratch[batch] = (
            np.ones((batch, c.dim), np.float32),
            np.ones((batch, c.n_heads * c.head_dim), np.float32),
            np.ones((batch, c.ffn_dim), np.float32),
        )
    x, attn, a = scratch[batch]
    w = model.weights
    for layer in w.layers:
        linear(x, layer.wqkv)
        linear(attn, layer.wo)
        linear(x, layer.w_gate_up)
        linear(a, layer.w_down)
    linear(x, w.output)


def bandwidth_bound(
    engine: Engine, nbytes: int, steps: int, rng: np.random.Generator
) -> dict[str, float]:
    """Seconds to read ``nbytes`` of float32 weights once in matrix-vector products (numpy's
    BLAS, all cores): a floor on a batch-1 decode step over weights of that many bytes. Timed
    alternately with batch-1 decode steps of ``engine``; ``share`` is the median over the
    pairs of bound time / step time, so the machine's drift enters neither side alone."""
    cols = 4096
    w = np.ones((max(1, nbytes // (4 * cols)), cols), np.float32)
    x = np.ones(cols, np.float32)
    np.matvec(w, x)
    decoding = _Decoding(engine, [ALONE_SLOT], rng)
    decoding.step()
    times, steps_s = [], []
    for _ in range(max(steps, 15)):
        t0 = time.perf_counter()
        np.matvec(w, x)
        times.append(time.perf_counter() - t0)
        steps_s.append(decoding.step())
    t = statistics.median(times)
    share = statistics.median(b / s for b, s in zip(times, steps_s, strict=True))
    return {"ms": t * 1e3, "gb_per_s": w.nbytes / t / 1e9, "tokens_per_s": 1 / t, "share": share}


def arithmetic_bound(model: LLaMAModel, repeats: int = 7) -> dict[str, float]:
    """A prompt token's float32 multiply-adds in the layers' weight products (``2 x`` their
    weight values: the output head runs on one token of a prompt) at the rate numpy's BLAS
    multiplies large float32 matrices on all cores: a ceiling on prefill for any kernel that
    multiplies float32 activations by the weights' exact values, this engine's or a float32
    one's."""
    values = sum(w.rows * w.cols for layer in model.weights.layers for w in layer.linears)
    a = np.ones((1024, 2048), np.float32)
    b = np.ones((2048, 4096), np.float32)
    out = np.empty((1024, 4096), np.float32)
    np.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / statistics.median(times)
    return {"gflops": flops / 1e9, "tokens_per_s": flops / (2 * values)}


class _Decoding:
    """Greedy sequences in given cache slots, each past a 16-token random prompt; ``step()``
    runs one decode step of all of them and returns its seconds."""

    def __init__(self, engine: Engine, slots: list[int], rng: np.random.Generator) -> None:
        config = GenerationConfig.greedy(ignore_eos=True)
        prompts = [list(map(int, rng.integers(100, 40000, 16))) for _ in slots]
        self.engine, self.slots, self.pos = engine, slots, 16
        self.states = [engine.new_sampling(config, p) for p in prompts]
        self.tokens = self._tokens(
            engine.step(
                [
                    SequenceStep(s, p, 0, st)
                    for s, p, st in zip(slots, prompts, self.states, strict=True)
                ]
            )
        )

    def step(self) -> float:
        items = [
            SequenceStep(s, [t], self.pos, st)
            for s, t, st in zip(self.slots, self.tokens, self.states, strict=True)
        ]
        t0 = time.perf_counter()
        outs = self.engine.step(items)
        seconds = time.perf_counter() - t0  # the engine step alone, as before
        self.tokens = self._tokens(outs)
        self.pos += 1
        return seconds

    @staticmethod
    def _tokens(outs: list[TokenSample | None]) -> list[int]:
        return [o.token_id for o in outs if o is not None]


def bench_decode(
    engine: Engine, model: LLaMAModel, batch: int, steps: int, rng: np.random.Generator
) -> dict[str, float]:
    # Neighbouring slots, as the scheduler's SlotTable hands them out.
    decoding = _Decoding(engine, list(range(batch)), rng)
    scratch: dict[int, Any] = {}
    bare_matmuls(model, batch, scratch)  # warm up
    engine_times, bound_times = [], []
    for _ in range(steps):
        engine_times.append(decoding.step())
        t0 = time.perf_counter()
        bare_matmuls(model, batch, scratch)
        bound_times.append(time.perf_counter() - t0)
    e, b = statistics.median(engine_times), statistics.median(bound_times)
    ratios = [bt / et for et, bt in zip(engine_times, bound_times, strict=True)]
    return {
        "batch": batch,
        "step_ms": e * 1e3,
        "tokens_per_s": batch / e,
        "matmul_bound_ms": b * 1e3,
        "matmul_bound_tokens_per_s": batch / b,
        "share_of_bound": statistics.median(ratios),
        "other_ms_per_step": (e - b) * 1e3,
    }


def bench_batching_gain(engine: Engine, steps: int, rng: np.random.Generator) -> dict[str, float]:
    """Tokens/s at batch 32 over tokens/s at batch 1, from decode steps of the two sizes timed
    alternately (each round one of each, the order swapped every round), so that the machine's
    drift between the two sections of :func:`bench_decode` does not enter the ratio."""
    groups = {1: _Decoding(engine, [ALONE_SLOT], rng), 32: _Decoding(engine, list(range(32)), rng)}
    times: dict[int, list[float]] = {1: [], 32: []}
    for i in range(steps):
        for size in (1, 32) if i % 2 else (32, 1):
            times[size].append(groups[size].step())
    gains = [32 * t1 / t32 for t1, t32 in zip(times[1], times[32], strict=True)]
    return {
        "rounds": steps,
        "batch1_step_ms": statistics.median(times[1]) * 1e3,
        "batch32_step_ms": statistics.median(times[32]) * 1e3,
        "gain": statistics.median(gains),
    }


def bench_prefill(
    engine: Engine, length: int, repeats: int, rng: np.random.Generator
) -> dict[str, float]:
    times = []
    slot = 0
    for _ in range(repeats):
        prompt = list(map(int, rng.integers(100, 40000, length)))
        t0 = time.perf_counter()
        engine.step(
            [SequenceStep(slot, prompt, 0, engine.new_sampling(GenerationConfig.greedy(), prompt))]
        )
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"prompt_tokens": length, "ms": t * 1e3, "tokens_per_s": length / t}


def bench_memory(
    model_path: str | None, slots: int, context: int, activations: Activations
) -> dict[str, float]:
    """Peak resident set of a fresh process that loads the model and fills every slot of a
    ``slots`` x ``context`` cache to its last position."""
    cmd = [sys.executable, __file__, "--memory-only", f"--slots={slots}", f"--context={context}"]
    cmd.append(f"--activations={activations}")
    if model_path:
        cmd.append(f"--model={model_path}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _memory_only(
    model_path: str | None, slots: int, context: int, activations: Activations
) -> None:
    model, tokenizer = load_model(model_path, progress=False, activations=activations)
    engine = Engine(model, tokenizer, n_slots=slots, max_context=context)
    chunk = 512
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        for first in range(0, slots, 4):  # four sequences per step
            engine.step(
                [SequenceStep(s, [7] * n, start, None) for s in range(first, min(first + 4, slots))]
            )
    peak_kib = _peak_rss_kib()
    print(
        json.dumps(
            {
                "slots": slots,
                "context": context,
                "kv_cache_mib": engine.cache.nbytes / 2**20,
                "peak_rss_mib": peak_kib / 1024,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=None, help="GGUF file or packaged model name (default model if omitted)"
    )
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    ap.add_argument(
        "--batches", default=",".join(map(str, BATCHES)), help="decode batch sizes (32 is needed)"
    )
    ap.add_argument(
        "--prefill", default=",".join(map(str, PREFILL_LENGTHS)), help="prompt lengths timed"
    )
    ap.add_argument(
        "--activations",
        choices=get_args(Activations),
        default=DEFAULT_ACTIVATIONS,
        help="what the quantized layers multiply (see load_model)",
    )
    ap.add_argument("--out", default=None, help="JSON results file (default: by model)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--slots", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_only:
        _memory_only(args.model, args.slots, args.context, args.activations)
        return

    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, activations=args.activations)
    load_s = time.perf_counter() - t0
    rss_after_load = _rss_kib("VmRSS") / 1024
    peak_during_load = _peak_rss_kib() / 1024
    file_mib = Path(model_path(args.model, progress=False)).stat().st_size / 2**20
    rng = np.random.default_rng(0)
    engine = Engine(model, tokenizer, n_slots=max(*batches, ALONE_SLOT + 1), max_context=1024)

    prefill = [bench_prefill(engine, int(n), 5, rng) for n in args.prefill.split(",")]
    decode = [bench_decode(engine, model, b, args.steps, rng) for b in batches]
    gain = bench_batching_gain(engine, args.steps, rng)
    bound = bandwidth_bound(engine, model.weights.nbytes, args.steps, rng)
    del engine
    arithmetic = arithmetic_bound(model)
    memory = None if args.skip_memory else bench_memory(args.model, 32, 1024, args.activations)

    b1 = next(d for d in decode if d["batch"] == 1)["tokens_per_s"]
    b32 = next((d for d in decode if d["batch"] == 32), {"tokens_per_s": float("nan")})[
        "tokens_per_s"
    ]
    result = {
        "model": repr(model),
        "activations": args.activations,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": _cores(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "load_s": load_s,
        "file_mib": file_mib,
        "weights_mib": model.weights.nbytes / 2**20,
        "rss_after_load_mib": rss_after_load,
        "peak_rss_during_load_mib": peak_during_load,
        "bandwidth_bound_batch1": bound,
        "arithmetic_bound_prefill": arithmetic,
        "prefill": prefill,
        "decode": decode,
        "batch32_over_batch1": b32 / b1,
        "batch32_over_batch1_alternated": gain,
        "memory": memory,
    }
    print(
        f"model: {result['model']}\nload: {load_s:.2f} s; RSS after load {rss_after_load:.0f} "
        f"MiB (peak {peak_during_load:.0f}), file {file_mib:.0f} MiB, weights "
        f"{result['weights_mib']:.0f} MiB\n"
    )
    print("prefill          ms    tokens/s  share of the arithmetic bound")
    for p in prefill:
        print(
            f"  {p['prompt_tokens']:>4} tokens {p['ms']:>8.1f} {p['tokens_per_s']:>9.0f} "
            f"{p['tokens_per_s'] / arithmetic['tokens_per_s']:>9.0%}"
        )
    print(
        f"arithmetic bound on prefill: {arithmetic['tokens_per_s']:.1f} tokens/s (float32 "
        f"products at {arithmetic['gflops']:.0f} GFLOPS, numpy's BLAS on all cores)"
    )
    print("\ndecode   step ms  tokens/s  matmul-bound tokens/s  share  other ms/step")
    for d in decode:
        print(
            f"  B={d['batch']:<3} {d['step_ms']:>8.1f} {d['tokens_per_s']:>9.0f} "
            f"{d['matmul_bound_tokens_per_s']:>16.0f} {d['share_of_bound']:>10.0%} "
            f"{d['other_ms_per_step']:>9.1f}"
        )
    print(
        f"\nbandwidth bound at batch 1: {bound['tokens_per_s']:.1f} tokens/s "
        f"({bound['gb_per_s']:.1f} GB/s of float32 weights); batch 1 reaches "
        f"{b1 / bound['tokens_per_s']:.0%} of it, {bound['share']:.0%} from steps alternated "
        "with the bound's reads"
    )
    print(
        f"batch 32 / batch 1: {result['batch32_over_batch1']:.1f}x from the sections above, "
        f"{gain['gain']:.1f}x from {gain['rounds']} alternated rounds (steps of "
        f"{gain['batch1_step_ms']:.1f} and {gain['batch32_step_ms']:.1f} ms)"
    )
    if memory:
        print(
            f"peak RSS, {memory['slots']} slots x {memory['context']} tokens filled: "
            f"{memory['peak_rss_mib']:.0f} MiB (KV cache {memory['kv_cache_mib']:.0f} MiB)"
        )
    results = Path(__file__).parent / "results"
    name = f"engine-{Path(args.model).name.removesuffix('.gguf')}.json" if args.model else ""
    out = Path(args.out) if args.out else results / (name or "engine.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


def _peak_rss_kib() -> int:
    """Peak resident set of this process. /proc's VmHWM belongs to this process alone;
    getrusage's ru_maxrss can carry the parent's peak across fork and exec on Linux."""
    return _rss_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: peak), 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
