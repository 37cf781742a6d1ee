"""Structured output on the default model: its cost in the decode step, compile times,
jump-forward, and how often an answer on a small budget is whole.

1. ``step``: 32 sequences of one chat prompt decode ``--steps`` tokens (seeded sampling), the
   batch free and the batch constrained alternating, ``--rounds`` times. Reported: median step
   time of each and their ratio (the mask is computed and applied per constrained row between
   the logits and the choice, inside the step).
2. ``compile``: each schema of the test suite and a few larger ones compiled from scratch
   (a new compiler each time, so nothing is cached) ``--compiles`` times; p50 and p99. And the
   cost of a cached constraint (a copy of the compiled matcher).
3. ``jump``: one greedy answer under a form schema with 13 fixed keys, with and without
   feeding the tokens the schema forces in one step: decode steps, tokens, wall time.
4. ``budget``: JSON mode (4 asks) and 13 schemas (tool arguments, records, lists, patterns,
   the 13-key form; most do not mention ``additionalProperties``), each answered greedily and
   with three seeded samples, at ``max_tokens`` 32, 48, 64 and 128, in one batch per budget.
   Reported: the share of answers that parse and validate against the schema as written,
   three ways: *before* (objects read as written, i.e. open, and no budget-aware closing: the
   library before both), *closed* (objects closed by default, no closing) and *after* (both);
   and which schemas can be completed within each budget at all (the shortest closing path
   from the start), with the share of whole answers among those.
5. ``steer``: the steering's own time per generated token (thread CPU time), beside the
   constraint hook's whole time, for greedy answers far from their budget and reaching it.

    python benchmarks/structured.py [--sections step,compile,jump,budget,steer]
        [--rounds 5] [--steps 24] [--compiles 20]

Writes ``structured.json`` (step, compile, jump) and ``structured_budget.json`` (budget,
steer) into ``--out``, for the sections run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import numpy as np
from numpy.typing import NDArray

from zigllama_batch import (
    BatchConfig,
    BatchingStrategy,
    BatchProcessor,
    BatchRequest,
    FinishReason,
    GenerationConfig,
    GenerationResult,
    StructuredOutput,
    TextGenerator,
    load_model,
)
from zigllama_batch.engine import Engine, SequenceStep
from zigllama_batch.engine.closing import BudgetCloser, closing_path
from zigllama_batch.engine.grammar import GrammarCompiler, GrammarHook

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


def _object(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    """An object schema requiring every property, silent on other keys (as most are written)."""
    return {"type": "object", "properties": properties, "required": list(properties), **more}


_TEXT = {"type": "string"}
BUDGET_SCHEMAS: list[tuple[str, str, Any]] = [
    *((f"test schema {i + 1}", ask, schema) for i, (ask, schema) in enumerate(SCHEMAS)),
    (
        "get_weather arguments",
        "Call get_weather(city, unit) for: what's the weather in Paris, in celsius? As JSON.",
        _object({"city": _TEXT, "unit": {"enum": ["c", "f"]}}),
    ),
    (
        "search arguments",
        "Call search(query, max_results) for: find me 3 articles about black holes. As JSON.",
        _object({"query": _TEXT, "max_results": {"type": "integer"}}),
    ),
    (
        "create_event arguments",
        "Call create_event(title, date, attendees) for: lunch with Ana and Bo on 2025-06-01.",
        _object({"title": _TEXT, "date": _TEXT, "attendees": {"type": "array", "items": _TEXT}}),
    ),
    (
        "person",
        "Describe a made-up person as JSON.",
        _object({"name": _TEXT, "age": {"type": "integer", "minimum": 0}, "email": _TEXT}),
    ),
    (
        "recipe",
        "Give a pancake recipe as JSON.",
        _object(
            {
                "name": _TEXT,
                "ingredients": {"type": "array", "items": _TEXT, "minItems": 2},
                "minutes": {"type": "integer"},
            }
        ),
    ),
    (
        "sentiment",
        "Classify the sentiment of 'I loved this film' as JSON.",
        _object(
            {
                "label": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            }
        ),
    ),
    (
        "address",
        "Give the address of a made-up shop as JSON.",
        _object(
            {
                "street": _TEXT,
                "city": _TEXT,
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["US", "FR", "DE"]},
            }
        ),
    ),
    (
        "order",
        "Write a small shop order as JSON.",
        _object(
            {
                "id": {"type": "integer"},
                "items": {
                    "type": "array",
                    "items": _object(
                        {
                            "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                        }
                    ),
                    "minItems": 1,
                },
                "paid": {"type": "boolean"},
            }
        ),
    ),
    (
        "summary",
        "Summarise the plot of Hamlet as JSON.",
        _object({"title": _TEXT, "summary": _TEXT}),
    ),
    ("contact form", "Fill in a contact form for a made-up person, as JSON.", FORM),
]
JSON_ASKS = [
    "Give me JSON.",
    "Describe a cat as JSON.",
    "List three fruits as JSON.",
    "Tell me about the weather today, in JSON.",
]
BUDGETS = (32, 48, 64, 128)
SAMPLES = 4  # per ask: greedy, then seeded samples
WAYS = {  # name: (objects closed by default, budget-aware closing)
    "before": (False, False),
    "closed": (True, False),
    "after": (True, True),
}


def _opened(schema: Any) -> Any:
    """``schema`` read as JSON Schema does (and the library did): every object that lists its
    keys but is silent on others given ``additionalProperties: true``."""
    if isinstance(schema, list):
        return [_opened(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _opened(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = True
    return out


def _valid(result: GenerationResult, schema: Any) -> bool:
    """Whether the answer is whole: it parses and validates against ``schema``."""
    try:
        jsonschema.validate(json.loads(result.text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _config(sample: int, budget: int, structured: StructuredOutput) -> GenerationConfig:
    base = GenerationConfig.greedy() if sample == 0 else GenerationConfig.balanced(seed=sample)
    return base.with_(max_tokens=budget, structured=structured)


async def _answers(
    model: Any, tokenizer: Any, requests: list[BatchRequest], closing: bool
) -> list[GenerationResult]:
    """Every request's result, all in one batch."""
    config = BatchConfig(
        strategy=BatchingStrategy.CONTINUOUS, max_batch_size=len(requests), max_context=512
    )
    async with BatchProcessor(model, tokenizer, config) as processor:
        assert isinstance(processor.engine, Engine)
        processor.engine.grammars.close_within_budget = closing
        done = await asyncio.gather(*(processor.submit(r) for r in requests))
    return [d.result for d in done]


def bench_budget(model: Any, tokenizer: Any) -> dict[str, Any]:
    """Share of whole answers per budget, before and after; which schemas can fit."""
    asks = [(f"json mode: {a}", a, {"type": "object"}) for a in JSON_ASKS] + BUDGET_SCHEMAS
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size)
    needed = {}  # tokens the shortest closing path from the start takes, per schema
    for name, _, schema in asks:
        hook = compiler.hook(StructuredOutput.json_schema(schema))
        path = closing_path(hook.matcher, compiler.closing_tables(), -1, 512)
        needed[name] = len(path) if path is not None else None
    rows: dict[str, dict[str, Any]] = {}
    for budget in BUDGETS:
        row: dict[str, Any] = {"fits": [n for n, k in needed.items() if k and k <= budget]}
        for way, (closed, closing) in WAYS.items():
            requests = [
                BatchRequest(
                    prompt=[{"role": "user", "content": ask}],
                    config=_config(
                        i,
                        budget,
                        StructuredOutput.json_schema(schema if closed else _opened(schema)),
                    ),
                )
                for _, ask, schema in asks
                for i in range(SAMPLES)
            ]
            started = time.perf_counter()
            results = asyncio.run(_answers(model, tokenizer, requests, closing))
            valid: dict[str, int] = {}
            for (name, _, schema), group in zip(asks, _chunks(results, SAMPLES), strict=True):
                valid[name] = sum(_valid(r, schema) for r in group)
            row[way] = {
                "valid": valid,
                "stop": sum(r.finish_reason == FinishReason.STOP for r in results),
                "tokens": sum(r.completion_tokens for r in results),
                "wall_s": time.perf_counter() - started,
            }
            print(f"  budget {budget} {way}: {sum(valid.values())}/{len(results)} whole")
        rows[str(budget)] = row
    return {
        "samples_per_ask": SAMPLES,
        "needed_tokens": needed,
        "budgets": rows,
    }


def _chunks(items: list[GenerationResult], n: int) -> list[list[GenerationResult]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def bench_steer_cost(model: Any, tokenizer: Any) -> dict[str, Any]:
    """The steering's own time per generated token, against the constraint hook's whole time
    (its mask, and the steering), in thread CPU time (a shared machine's load does not count):
    greedy, one answer per schema, far from the budget (512 tokens: most answers end long
    before) and reaching it (32 tokens)."""
    spent = {"hook": 0.0, "steer": 0.0}
    real_adjust, real_steer = GrammarHook.adjust, BudgetCloser.steer

    def adjust(hook: GrammarHook, logits: NDArray[np.float32]) -> None:
        started = time.thread_time()
        real_adjust(hook, logits)
        spent["hook"] += time.thread_time() - started

    def steer(closer: BudgetCloser, matcher: Any, logits: NDArray[np.float32]) -> None:
        started = time.thread_time()
        real_steer(closer, matcher, logits)
        spent["steer"] += time.thread_time() - started

    GrammarHook.adjust = adjust  # type: ignore[method-assign,assignment]
    BudgetCloser.steer = steer  # type: ignore[method-assign,assignment]
    out: dict[str, Any] = {}
    try:
        for budget in (512, 32):
            gen = TextGenerator(model, tokenizer)
            gen.engine.grammars.closing_tables()  # built once, outside the timing
            spent.update(hook=0.0, steer=0.0)
            tokens = 0
            for _, ask, schema in BUDGET_SCHEMAS:
                config = GenerationConfig.greedy(
                    max_tokens=budget, structured=StructuredOutput.json_schema(schema)
                )
                tokens += gen.generate([{"role": "user", "content": ask}], config).completion_tokens
            out[f"budget {budget}"] = {
                "tokens": tokens,
                "hook_us_per_token": spent["hook"] / tokens * 1e6,
                "steer_us_per_token": spent["steer"] / tokens * 1e6,
            }
    finally:
        GrammarHook.adjust = real_adjust  # type: ignore[method-assign]
        BudgetCloser.steer = real_steer  # type: ignore[method-assign]
    return out


def print_budget(budget: dict[str, Any]) -> None:
    n_json = len(JSON_ASKS) * SAMPLES
    n_schemas = len(BUDGET_SCHEMAS) * SAMPLES
    print(
        f"\nwhole answers (parse + validate), {SAMPLES} per ask (greedy + seeded); JSON mode: "
        f"{len(JSON_ASKS)} asks, schemas: {len(BUDGET_SCHEMAS)}"
    )
    print(f"{'max_tokens':>10} | {'JSON mode before / closed / after':>34} | "
          f"{'schemas before / closed / after':>32} | schemas that fit: after")  # fmt: skip
    for b, row in budget["budgets"].items():
        cells = []
        for prefix, total in (("json mode", n_json), ("", n_schemas)):
            shares = []
            for way in WAYS:
                v = row[way]["valid"]
                ok = sum(c for k, c in v.items() if k.startswith("json mode") == bool(prefix))
                shares.append(f"{ok / total:4.0%}")
            cells.append(" / ".join(shares))
        fits = [n for n in row["fits"] if not n.startswith("json mode")]
        after_fit = sum(row["after"]["valid"][n] for n in fits) / max(1, len(fits) * SAMPLES)
        print(f"{b:>10} | {cells[0]:>34} | {cells[1]:>32} | "
              f"{len(fits):>2} of {len(BUDGET_SCHEMAS)}: {after_fit:4.0%}")  # fmt: skip
    print("\nshortest completion from the start (tokens):")
    print(", ".join(f"{k}: {v}" for k, v in budget["needed_tokens"].items()))


def print_steer_cost(cost: dict[str, Any]) -> None:
    print("\nper generated token, thread CPU time (greedy, one answer per schema):")
    print(f"{'':12} {'hook (mask + steering) us':>26} {'steering us':>12} {'tokens':>7}")
    for name, row in cost.items():
        print(f"{name:12} {row['hook_us_per_token']:>26.1f} {row['steer_us_per_token']:>12.1f} "
              f"{row['tokens']:>7}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="step,compile,jump,budget,steer")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--compiles", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    model, tokenizer = load_model()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine()}
    if sections & {"step", "compile", "jump"}:
        engine = Engine(model, tokenizer, n_slots=BATCH, max_context=512)
        out: dict[str, Any] = {"machine": machine}
        if "compile" in sections:
            out["compile"] = compile_ = bench_compile(engine, args.compiles)
            print("\ncompile from scratch        p50 ms   p99 ms")
            for name, c in compile_["per_schema"].items():
                print(f"{name:<26} {c['p50_ms']:>7.2f} {c['p99_ms']:>8.2f}")
            print(f"all schemas p99: {compile_['p99_ms_all']:.2f} ms; a cached constraint's hook: "
                  f"{compile_['cached_hook_us']:.1f} us")  # fmt: skip
        if "step" in sections:
            out["step"] = step = bench_step(engine, args.rounds, args.steps)
            print(f"\ndecode step at batch {BATCH}, every sequence under a JSON schema vs free")
            print(f"{'':14} {'step ms (median)':>17}")
            print(f"{'free':14} {step['free_step_ms_median']:>17.1f}")
            print(f"{'constrained':14} {step['constrained_step_ms_median']:>17.1f}")
            print(
                f"ratio {step['ratio']:.3f} ({args.rounds} rounds x {args.steps} steps, alternating)"
            )
        if "jump" in sections:
            out["jump_forward"] = jump = bench_jump(model, tokenizer, 3)
            on, off = jump["on"], jump["off"]
            print("\njump-forward, one greedy answer under a 13-key form schema (median of 3)")
            print(f"{'':6} {'steps':>6} {'tokens':>7} {'wall s':>7}")
            for name, row in (("off", off), ("on", on)):
                print(f"{name:6} {row['steps']:>6.0f} {row['tokens']:>7.0f} {row['wall_s']:>7.2f}")
            print(f"steps cut by {jump['steps_cut']:.0%}; wall time x{jump['wall_ratio']:.2f}")
        (args.out / "structured.json").write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {args.out / 'structured.json'}")
    if sections & {"budget", "steer"}:
        path = args.out / "structured_budget.json"
        found = json.loads(path.read_text()) if path.exists() else {}
        if "budget" in sections:
            found.update(bench_budget(model, tokenizer))
            print_budget(found)
        if "steer" in sections:
            found["steer_cost"] = bench_steer_cost(model, tokenizer)
            print_steer_cost(found["steer_cost"])
        path.write_text(json.dumps({**found, "machine": machine}, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
