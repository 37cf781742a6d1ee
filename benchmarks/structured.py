"""Structured output's cost on the default model: the decode step at batch 32 with every
sequence under a JSON schema against the same batch unconstrained, and compile times.

1. ``step``: 32 sequences of one chat prompt decode ``--steps`` tokens (seeded sampling), the
   batch free and the batch constrained alternating, ``--rounds`` times. Reported: median step
   time of each and their ratio (the mask is computed and applied per constrained row between
   the logits and the choice, inside the step).
3. ``jump_forward``: one greedy answer under a form schema with 13 fixed keys, with and
   without feeding the tokens the schema forces in one step: decode steps, tokens, wall time.
2. ``compile``: each schema of the test suite and a few larger ones compiled from scratch
   (a new compiler each time, so nothing is cached) ``--compiles`` times; p50 and p99. And the
   cost of a cached constraint (a copy of the compiled matcher).

    python benchmarks/structured.py [--rounds 5] [--steps 24] [--compiles 20]

Writes ``structured.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from zigllama_batch import GenerationConfig, StructuredOutput, load_model
from zigllama_batch.engine import Engine, SequenceStep
from zigllama_batch.engine.grammar import GrammarCompiler

BATCH = 32

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "batching"))
from test_structured_real_model import SCHEMAS  # type: ignore[import-not-found]  # noqa: E402

LARGE = {  # a wider schema: many fixed keys, nested arrays of objects
    "type": "object",
    "properties": {
        **{f"field_{i}": {"type": "string", "maxLength": 12} for i in range(20)},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{6}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]}},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
        },
    },
    "required": [f"field_{i}" for i in range(20)],
    "additionalProperties": False,
}
LONG_OUTPUT = {  # long enough that no sequence completes within the timed steps
    "type": "object",
    "properties": {
        "entries": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"word": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["word", "n"],
            },
            "minItems": 40,
        }
    },
    "required": ["entries"],
}


def bench_step(engine: Engine, rounds: int, steps: int) -> dict[str, Any]:
    tok = engine.tokenizer
    prompt = tok.encode_prompt([{"role": "user", "content": "List some words as JSON."}])
    for slot in range(BATCH):  # every slot holds the prompt; each round decodes after it
        engine.step([SequenceStep(slot, prompt, 0)])
    engine.grammars.jump_forward = False  # every row samples one token per step: the mask's cost
    times: dict[str, list[float]] = {"free": [], "constrained": []}
    structured = StructuredOutput.json_schema(LONG_OUTPUT)
    for r in range(rounds):
        for mode in ("free", "constrained") if r % 2 == 0 else ("constrained", "free"):
            configs = [
                GenerationConfig.balanced(
                    seed=1000 * r + i,
                    max_tokens=steps + 1,
                    structured=structured if mode == "constrained" else None,
                )
                for i in range(BATCH)
            ]
            states = [engine.new_sampling(c, prompt) for c in configs]
            last = [prompt[-1]] * BATCH
            pos = len(prompt) - 1  # re-feed the last prompt token: its logits give token 1
            for _ in range(steps):
                items = [
                    SequenceStep(slot, [last[slot]], pos, states[slot]) for slot in range(BATCH)
                ]
                started = time.perf_counter()
                out = engine.step(items)
                times[mode].append(time.perf_counter() - started)
                last = [o.token_id for o in out if o is not None]
                pos += 1
            errors = [s.hook.error for s in states if s.hook is not None and s.hook.error]
            assert not errors, errors
            finished = [s.hook for s in states if s.hook is not None and s.hook.finished]
            assert not finished, "a constrained sequence completed inside the timed steps"
    free = statistics.median(times["free"]) * 1000
    constrained = statistics.median(times["constrained"]) * 1000
    return {
        "batch": BATCH,
        "steps_per_round": steps,
        "rounds": rounds,
        "free_step_ms_median": free,
        "constrained_step_ms_median": constrained,
        "ratio": constrained / free,
    }


def bench_compile(engine: Engine, repeats: int) -> dict[str, Any]:
    schemas = {f"test schema {i + 1}": s for i, (_, s) in enumerate(SCHEMAS)}
    schemas["large (20 keys, nested arrays)"] = LARGE
    schemas["long output"] = LONG_OUTPUT
    warm = GrammarCompiler(engine.tokenizer, engine.model.config.vocab_size)
    warm.check(StructuredOutput.json_object())  # builds the llguidance tokenizer once
    tokenizer = warm._llg_tokenizer()
    per: dict[str, dict[str, float]] = {}
    all_ms: list[float] = []
    for name, schema in schemas.items():
        structured = StructuredOutput.json_schema(schema)
        ms = []
        for _ in range(repeats):
            compiler = GrammarCompiler(engine.tokenizer, engine.model.config.vocab_size)
            compiler._tokenizer = tokenizer  # shared: only the grammar is compiled
            started = time.perf_counter()
            compiler.check(structured)
            ms.append((time.perf_counter() - started) * 1000)
        all_ms += ms
        per[name] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    structured = StructuredOutput.json_schema(LARGE)
    warm.check(structured)
    started = time.perf_counter()
    for _ in range(1000):
        warm.hook(structured)
    cached_us = (time.perf_counter() - started) * 1000
    return {
        "per_schema": per,
        "p99_ms_all": float(np.percentile(all_ms, 99)),
        "cached_hook_us": cached_us,
    }


FORM = {  # schema-heavy: many fixed keys, short free values
    "type": "object",
    "properties": {
        **{
            name: {"type": "string", "maxLength": 16}
            for name in (
                "first_name",
                "last_name",
                "street_address",
                "city",
                "postal_code",
                "country",
                "email_address",
                "phone_number",
                "employer",
                "job_title",
            )
        },
        "age_in_years": {"type": "integer", "minimum": 0, "maximum": 120},
        "newsletter_subscription": {"type": "boolean"},
        "preferred_contact_method": {"enum": ["email", "phone", "post"]},
    },
    "additionalProperties": False,
}
FORM["required"] = list(FORM["properties"])  # type: ignore[call-overload]


def bench_jump(model: Any, tokenizer: Any, repeats: int) -> dict[str, Any]:
    """Decode steps and wall time of one greedy answer under FORM, with and without feeding
    forced tokens (jump-forward), alternating."""
    from zigllama_batch import TextGenerator

    prompt = [{"role": "user", "content": "Fill in a contact form for a made-up person, as JSON."}]
    config = GenerationConfig.greedy(max_tokens=400, structured=StructuredOutput.json_schema(FORM))
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for r in range(repeats):
        for jump in (True, False) if r % 2 == 0 else (False, True):
            gen = TextGenerator(model, tokenizer)
            gen.engine.grammars.jump_forward = jump
            steps = 0
            real_step = gen.engine.step

            def step(items: Any, real_step: Any = real_step) -> Any:
                nonlocal steps
                steps += 1
                return real_step(items)

            gen.engine.step = step  # type: ignore[method-assign]
            started = time.perf_counter()
            result = gen.generate(prompt, config)
            wall = time.perf_counter() - started
            json.loads(result.text)  # valid JSON, or the benchmark fails
            runs[jump].append({"steps": steps, "tokens": result.completion_tokens, "wall_s": wall})
    on = {k: statistics.median(x[k] for x in runs[True]) for k in ("steps", "tokens", "wall_s")}
    off = {k: statistics.median(x[k] for x in runs[False]) for k in ("steps", "tokens", "wall_s")}
    return {
        "on": on,
        "off": off,
        "steps_cut": 1 - on["steps"] / off["steps"],
        "wall_ratio": on["wall_s"] / off["wall_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--compiles", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    model, tokenizer = load_model()
    engine = Engine(model, tokenizer, n_slots=BATCH, max_context=512)
    compile_ = bench_compile(engine, args.compiles)
    step = bench_step(engine, args.rounds, args.steps)
    jump = bench_jump(model, tokenizer, 3)
    print(f"decode step at batch {BATCH}, every sequence under a JSON schema vs free")
    print(f"{'':14} {'step ms (median)':>17}")
    print(f"{'free':14} {step['free_step_ms_median']:>17.1f}")
    print(f"{'constrained':14} {step['constrained_step_ms_median']:>17.1f}")
    print(f"ratio {step['ratio']:.3f} ({args.rounds} rounds x {args.steps} steps, alternating)")
    print("\ncompile from scratch        p50 ms   p99 ms")
    for name, c in compile_["per_schema"].items():
        print(f"{name:<26} {c['p50_ms']:>7.2f} {c['p99_ms']:>8.2f}")
    print(f"all schemas p99: {compile_['p99_ms_all']:.2f} ms; a cached constraint's hook: "
          f"{compile_['cached_hook_us']:.1f} us")  # fmt: skip
    on, off = jump["on"], jump["off"]
    print("\njump-forward, one greedy answer under a 13-key form schema (median of 3)")
    print(f"{'':6} {'steps':>6} {'tokens':>7} {'wall s':>7}")
    for name, row in (("off", off), ("on", on)):
        print(f"{name:6} {row['steps']:>6.0f} {row['tokens']:>7.0f} {row['wall_s']:>7.2f}")
    print(f"steps cut by {jump['steps_cut']:.0%}; wall time x{jump['wall_ratio']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {"cpu": platform.processor() or platform.machine()},
        "step": step,
        "compile": compile_,
        "jump_forward": jump,
    }
    (args.out / "structured.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out / 'structured.json'}")


if __name__ == "__main__":
    main()
