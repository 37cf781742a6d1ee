"""lm-evaluation-harness against ``zigllama-batch serve``, checked against the engine in-process.

lm-eval's ``local-completions`` model scores each answer of a multiple-choice question by
asking ``/v1/completions`` to echo the question and answer with their logprobs (``echo``,
``logprobs: 1``) and summing the answer's tokens; the most likely answer is the model's pick.
This runs the small local task in ``benchmarks/lm_eval/`` (capitals of 30 countries, four
answers each) that way against a server on the default model, then scores the same questions
in-process (``prompt_logprobs`` through a :class:`~zigllama_batch.BatchProcessor`, the question
and answer tokenized as lm-eval does), and checks that both pick the same answers.

    pip install "lm-eval[api]" transformers  # transformers reads the exported tokenizer
    python benchmarks/lm_eval_check.py [--out benchmarks/results/lm_eval.json]

Run from the repository root (the task's data path is relative to it). Writes the two
accuracies, each choice's log-likelihood from both sides and their largest difference to
``--out``; exits 1 if the picks differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zigllama_batch import (
    BatchConfig,
    BatchProcessor,
    BatchRequest,
    GenerationConfig,
    Tokenizer,
    TokenLogprob,
    load_model,
)
from zigllama_batch.engine import save_tokenizer_files
from zigllama_batch.testing import ServerProcess, cpu_name

ROOT = Path(__file__).resolve().parent.parent
TASK = "zigllama_capitals"
TASK_DIR = ROOT / "benchmarks" / "lm_eval"
DOCS = TASK_DIR / "capitals.jsonl"
QUESTION = "Question: What is the capital of {country}?\nAnswer:"  # the task's doc_to_text
DELIMITER = " "  # lm-eval's default target_delimiter between question and answer
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lm_eval_command(server: ServerProcess, tokenizer_dir: Path, output: Path) -> list[str]:
    """The lm-eval run against ``server``: the local-completions model, tokenized requests
    (the exported tokenizer), one request at a time."""
    model_args = ",".join(
        [
            f"model={server.model}",
            f"base_url={server.base_url}/v1/completions",
            "tokenizer_backend=huggingface",
            f"tokenizer={tokenizer_dir}",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )
    return [
        *(sys.executable, "-m", "lm_eval", "run"),
        *("--model", "local-completions", "--model_args", model_args),
        *("--tasks", TASK, "--include_path", str(TASK_DIR.relative_to(ROOT))),
        *("--output_path", str(output), "--log_samples"),
    ]


def run_lm_eval(tokenizer_dir: Path, work: Path) -> dict[str, Any]:
    """Serve the default model, run lm-eval against it; its accuracy, each choice's
    log-likelihood by document, and the command."""
    with ServerProcess() as server:
        command = lm_eval_command(server, tokenizer_dir, work / "lm_eval")
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, env={**os.environ, **OFFLINE}, check=True)
        model = server.model
    (results_file,) = (work / "lm_eval").rglob("results_*.json")
    (samples_file,) = (work / "lm_eval").rglob(f"samples_{TASK}_*.jsonl")
    acc = json.loads(results_file.read_text())["results"][TASK]["acc,none"]
    loglik: dict[int, list[float]] = {}
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        loglik[sample["doc_id"]] = [float(r[0][0]) for r in sample["resps"]]
    return {"model": model, "acc": acc, "loglik": [loglik[i] for i in sorted(loglik)]}


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """The tokens lm-eval sends for (context, continuation), and the context's length: the
    context's trailing spaces move to the continuation, the whole text is encoded and split
    after the context's own tokens (no BOS: lm-eval's ``add_bos_token`` default)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=False)
    ctxlen = len(tokenizer.encode(context, add_bos=False))
    return whole, ctxlen


async def score_in_process(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each choice's log-likelihood (the sum of its tokens' prompt logprobs) from the engine in
    this process, with the server's batching defaults, and the accuracy of the argmax."""
    model, tokenizer = load_model(progress=False)
    scoring = GenerationConfig.greedy(max_tokens=0, prompt_logprobs=0)
    pairs = [
        encode_pair(tokenizer, QUESTION.format(country=doc["country"]), DELIMITER + choice)
        for doc in docs
        for choice in doc["choices"]
    ]
    async with BatchProcessor(model, tokenizer, BatchConfig.serving()) as processor:
        results = await asyncio.gather(
            *(processor.submit(BatchRequest(prompt=ids, config=scoring)) for ids, _ in pairs)
        )
    sums = iter(
        continuation_loglik(r.result.prompt_logprobs, ctxlen)
        for r, (_, ctxlen) in zip(results, pairs, strict=True)
    )
    loglik = [[next(sums) for _ in doc["choices"]] for doc in docs]
    right = [pick(ll) == doc["answer"] for ll, doc in zip(loglik, docs, strict=True)]
    return {"acc": sum(right) / len(docs), "loglik": loglik, "model": model.config.name}


def continuation_loglik(scores: Sequence[TokenLogprob | None] | None, ctxlen: int) -> float:
    """The log-likelihood of the tokens after the first ``ctxlen`` (a prompt's scores)."""
    assert scores is not None, "prompt_logprobs were asked for"
    return sum(s.logprob for s in scores[ctxlen:] if s is not None)


def pick(loglik: Sequence[float]) -> int:
    """The most likely choice."""
    return max(range(len(loglik)), key=loglik.__getitem__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lm_eval.json")
    args = parser.parse_args()
    docs = [json.loads(line) for line in DOCS.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, tokenizer = load_model(progress=False)
        save_tokenizer_files(tokenizer, work / "tokenizer")
        server = run_lm_eval(work / "tokenizer", work)
    local = asyncio.run(score_in_process(docs))
    diff = max(
        abs(a - b)
        for x, y in zip(server["loglik"], local["loglik"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    picks_equal = all(
        pick(a) == pick(b) for a, b in zip(server["loglik"], local["loglik"], strict=True)
    )
    report = {
        "task": TASK,
        "documents": len(docs),
        "model": server["model"],
        "lm_eval_acc": server["acc"],
        "in_process_acc": local["acc"],
        "same_picks": picks_equal,
        "max_abs_loglikelihood_difference": diff,
        "lm_eval_loglikelihoods": server["loglik"],
        "in_process_loglikelihoods": local["loglik"],
        "cpu": cpu_name(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{TASK} ({len(docs)} questions, {server['model']}): lm-eval via the server "
        f"acc={server['acc']:.4f}; in-process acc={local['acc']:.4f}; same picks: "
        f"{picks_equal}; largest log-likelihood difference {diff:.2e}\nwrote {args.out}"
    )
    return 0 if picks_equal and server["acc"] == local["acc"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
