"""The ``zigllama-batch`` command line.

``zigllama-batch generate "PROMPT"`` streams a completion from the model to the terminal;
``zigllama-batch demo`` runs many concurrent requests through the batch processor;
``zigllama-batch serve`` serves the OpenAI-compatible HTTP API.
Each sub-command parses its own flags and calls the library; nothing here is needed to use
zigllama_batch from Python.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .batching.types import BatchingStrategy
from .errors import ZigllamaBatchError
from .generation import GenerationConfig, Prompt

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ZigllamaBatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zigllama-batch",
        description="Batched LLaMA-family inference on the CPU (pure numpy, GGUF models).",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt", help="the prompt text (a user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    gen.add_argument("--system", help="system message (with --chat)")
    _add_sampling_flags(gen)
    gen.add_argument("--no-stream", action="store_true", help="print the text once it is done")
    gen.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    gen.set_defaults(run=_generate)

    demo = commands.add_parser(
        "demo", help="fire many concurrent requests through the batch processor, live"
    )
    demo.add_argument(
        "--strategy", default="continuous", choices=[s.value for s in BatchingStrategy]
    )
    demo.add_argument("--requests", type=int, default=32, help="concurrent requests (default 32)")
    demo.add_argument("--max-batch-size", type=int, default=32)
    demo.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    demo.set_defaults(run=_demo)

    srv = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    srv.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    srv.add_argument("--model-name", help="id clients pass as `model` (default: file name)")
    srv.add_argument(
        "--strategy", default="continuous", choices=[s.value for s in BatchingStrategy]
    )
    srv.add_argument("--max-batch-size", type=int, default=32)
    srv.add_argument("--max-queue-size", type=int, default=1024)
    srv.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="positions per sequence (default: min(2048, model context))",
    )
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (or set ZIGLLAMA_BATCH_API_KEY)",
    )
    srv.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds a SIGTERM/SIGINT shutdown waits for requests in flight",
    )
    srv.add_argument("--log-level", default="info")
    srv.set_defaults(run=_serve)
    return parser


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    default = GenerationConfig()
    parser.add_argument("--max-tokens", type=int, default=default.max_tokens)
    parser.add_argument(
        "--temperature", type=float, default=default.temperature, help="0 for greedy decoding"
    )
    parser.add_argument("--top-k", type=int, default=default.top_k)
    parser.add_argument("--top-p", type=float, default=default.top_p)
    parser.add_argument("--seed", type=int, default=None)


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig the sampling flags describe (ValueError names a bad flag)."""
    return GenerationConfig(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def _generate(args: argparse.Namespace) -> int:
    from .generator import TextGenerator, load_model

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    generator = TextGenerator(model, tokenizer)
    prompt: Prompt = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = messages
    if args.no_stream:
        result = generator.generate(prompt, config)
        print(result.text)
    else:
        result = generator.generate(
            prompt, config, callback=lambda chunk, _: print(chunk, end="", flush=True)
        )
        print()
    print(
        f"[{generator.engine.model_name}: {result.completion_tokens} tokens, {result.tokens_per_second:.1f} tokens/s, "
        f"first token after {result.time_to_first_token_ms:.0f} ms, "
        f"finish: {result.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from .demo import format_summary, run_demo
    from .generator import load_model

    if args.requests < 1 or args.max_batch_size < 1:
        print("error: --requests and --max-batch-size must be >= 1", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    print(
        f"{model!r}\n{args.requests} requests, strategy {args.strategy}, "
        f"max batch size {args.max_batch_size}",
        file=sys.stderr,
    )
    summary = asyncio.run(
        run_demo(
            model,
            tokenizer,
            strategy=args.strategy,
            requests=args.requests,
            max_batch_size=args.max_batch_size,
        )
    )
    print(format_summary(summary, args.strategy))
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .server.run import serve
    except ImportError as exc:
        print(
            f"error: the server needs its extra: pip install 'zigllama-batch[server]' ({exc})",
            file=sys.stderr,
        )
        return 2
    from .batching.types import BatchConfig

    try:
        config = BatchConfig(
            strategy=BatchingStrategy(args.strategy),
            max_batch_size=args.max_batch_size,
            max_queue_size=args.max_queue_size,
            max_context=args.max_context,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return serve(
        model=args.model,
        config=config,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_name=args.model_name,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())
