"""The zigllama-batch command line, run in-process on the tiny model."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from zigllama_batch.cli import _parser, main


def _command_parser(command: str) -> argparse.ArgumentParser:
    """The argparse parser of one sub-command."""
    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = subparsers.choices[command]
    return parser


def test_generate_streams_text_and_reports_stats(
    tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`generate` prints the completion on stdout and a one-line summary on stderr."""
    code = main(
        [
            "generate",
            "the cat",
            "--model",
            str(tiny_path),
            "--temperature",
            "0",
            "--max-tokens",
            "5",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip()
    assert err.startswith("[tiny: 5 tokens")  # the model, named by its file
    assert "finish: length" in err


def test_generate_with_int8_activations_loads_the_model_for_them(
    tiny_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`generate --activations int8` passes the choice to load_model and generates."""
    import zigllama_batch.generator

    asked: list[str] = []
    real_load = zigllama_batch.generator.load_model

    def load(*args: Any, activations: str, **kwargs: Any) -> Any:
        asked.append(activations)
        return real_load(*args, activations=activations, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zigllama_batch.generator, "load_model", load)
    code = main(["generate", "the cat", "--model", str(tiny_path), "--max-tokens", "3"])
    code += main(
        [
            "generate",
            "the cat",
            "--model",
            str(tiny_path),
            "--max-tokens",
            "3",
            "--activations",
            "int8",
        ]
    )
    assert code == 0
    assert asked == ["float32", "int8"]
    assert capsys.readouterr().err.count("finish: length") == 2


def test_generate_chat_without_streaming(
    tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--chat --no-stream` sends a chat message and prints the whole answer once."""
    assert (
        main(
            [
                "generate",
                "hi",
                "--chat",
                "--system",
                "be brief",
                "--no-stream",
                "--model",
                str(tiny_path),
                "--seed",
                "1",
                "--max-tokens",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().err.startswith("[")


def test_bad_flag_value_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid sampling flag exits 2 with the flag named, before any model loads."""
    assert main(["generate", "x", "--top-p", "7", "--model", "/nonexistent.gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --top-p: must be in")
    assert "top_p" not in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["demo", "--max-batch-size", "0"], "--max-batch-size"),
        (["demo", "--max-batch-size", "5000"], "--max-batch-size"),
        (["serve", "--max-batch-size", "0"], "--max-batch-size"),
        (["serve", "--max-queue-size", "0"], "--max-queue-size"),
        (["serve", "--max-context", "1"], "--max-context"),
        (["serve", "--strategy", "fixed_size", "--max-queue-size", "4"], "--max-queue-size"),
        (["generate", "x", "--max-tokens", "0"], "--max-tokens"),
        (["generate", "x", "--temperature", "-1"], "--temperature"),
    ],
)
def test_config_errors_name_the_flag_not_the_field(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value the config refuses exits 2 naming the flag (`--max-batch-size`), never the
    config field behind it (`max_batch_size`), before any model loads."""
    assert main([*argv, "--model", "/nonexistent.gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}: ")
    assert not re.search(rf"(?<![-\w]){flag.removeprefix('--').replace('-', '_')}\b", err)


def test_a_context_the_model_cannot_hold_names_the_flag(
    tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve --max-context` beyond the model's context is refused once the model is read,
    naming --max-context, with exit status 2."""
    argv = ["serve", "--model", str(tiny_path), "--port", "0", "--max-context", "100000"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: --max-context: must be in [2, " in err
    assert "max_context" not in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--foo", "demo"], "--foo"),
        (["--foo"], "--foo"),  # argparse alone: "the following arguments are required: COMMAND"
        (["--model", "m.gguf", "demo"], "--model"),  # argparse alone: "invalid choice: 'm.gguf'"
        (["--foo=1", "serve"], "--foo=1"),
    ],
)
def test_options_before_the_command_are_named(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An option given before the command exits 2 naming it and saying options go after the
    command."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: unrecognized arguments: {named} (options go after the command" in err


def test_an_unknown_option_of_a_command_is_reported_by_that_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`demo --foo` names --foo under demo's own usage line."""
    with pytest.raises(SystemExit) as info:
        main(["demo", "--foo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: zigllama-batch demo")
    assert "zigllama-batch demo: error: unrecognized arguments: --foo" in err


@pytest.mark.parametrize("command", ["generate", "demo", "serve"])
def test_help_describes_every_option_with_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`zigllama-batch COMMAND --help` has a description for every option and shows each
    default (None and False, "not given", are left to the description)."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    for action in _command_parser(command)._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.dest
        if action.default is not None and action.default is not False:
            assert f"(default: {action.default})" in text, action.dest


@pytest.mark.parametrize("argv", [["--version"], ["--version", "demo"]])
def test_version_names_the_installed_distribution(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`zigllama-batch --version` prints the installed version, which the package reports too,
    and exits 0."""
    from importlib.metadata import version

    import zigllama_batch

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert capsys.readouterr().out == f"zigllama-batch {version('zigllama-batch')}\n"
    assert zigllama_batch.__version__ == version("zigllama-batch")


def test_tokenizer_export_help_describes_its_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`tokenizer export --help` says what it writes and which tools read it."""
    with pytest.raises(SystemExit) as info:
        main(["tokenizer", "export", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: zigllama-batch tokenizer export [-h] [--model PATH|NAME] DIR" in text
    for words in ("tokenizer.json", "chat template", "AutoTokenizer", "guidellm", "--model"):
        assert words in text


def test_tokenizer_without_an_action_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """`zigllama-batch tokenizer` alone exits 2 naming the action it needs."""
    with pytest.raises(SystemExit) as info:
        main(["tokenizer"])
    assert info.value.code == 2
    assert "ACTION" in capsys.readouterr().err


def test_missing_model_file_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """A model path that does not exist exits 1 with a one-line error."""
    assert main(["generate", "x", "--model", "/nonexistent.gguf"]) == 1
    assert "model file not found" in capsys.readouterr().err


def test_an_unknown_model_name_is_reported_with_the_names_that_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--model` with a name no model has exits 1, listing the packaged models' names and ids
    and saying a .gguf path works too."""
    assert main(["generate", "x", "--model", "smollm3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no model is named 'smollm3'")
    assert "smollm2-135m" in err
    assert "SmolLM2-135M-Instruct.Q4_1" in err
    assert "path to a .gguf file" in err


def test_a_directory_as_model_is_reported_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--model DIR` exits 1 saying the path is a directory and a .gguf file is expected."""
    assert main(["generate", "x", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} is a directory" in err
    assert "GGUF model file (.gguf) is expected" in err


@pytest.mark.parametrize("strategy", ["fixed_size", "dynamic_timeout", "adaptive", "continuous"])
def test_demo_runs_concurrent_requests_and_prints_a_summary(
    tiny_path: Path, capsys: pytest.CaptureFixture[str], strategy: str
) -> None:
    """`demo` warms up, runs one request alone, pushes N requests through the processor, and
    prints the summary table with what batching gained over one request at a time."""
    code = main(
        [
            "demo",
            "--requests",
            "6",
            "--max-batch-size",
            "4",
            "--strategy",
            strategy,
            "--model",
            str(tiny_path),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "throughput" in out
    assert "mean batch size" in out
    assert f"6 requests, strategy {strategy}" in err
    assert err.index("warming up") < err.index("one request alone: ") < err.index("batched: ")
    assert re.search(r"^\s+one request alone\s+\d+\.\d tokens/s$", out, re.MULTILINE)
    assert re.search(
        r"^batching: \d+\.\dx the tokens/s of one request at a time \(these \d+ tokens: "
        r"\d+\.\d s batched, about \d+\.\d s one at a time\)$",
        out,
        re.MULTILINE,
    )
    assert re.search(r"^\s+model\s+tiny$", out, re.MULTILINE)  # the file's name, as served
    assert "tiny-test-llama" not in out + err  # not the file's internal general.name


def test_processor_works_from_a_plain_script(tiny_path: Path, tmp_path: Path) -> None:
    """A script using asyncio.run() and `async with BatchProcessor` runs to completion."""
    import subprocess
    import sys

    script = tmp_path / "app.py"
    script.write_text(
        "import asyncio\n"
        "from zigllama_batch import BatchProcessor, BatchConfig, BatchRequest, GenerationConfig, load_model\n"
        "async def main():\n"
        f"    model, tokenizer = load_model({str(tiny_path)!r})\n"
        "    async with BatchProcessor(model, tokenizer, BatchConfig(max_batch_size=4)) as p:\n"
        "        rs = await asyncio.gather(*(p.submit(BatchRequest(prompt='the cat',\n"
        "            config=GenerationConfig.greedy(max_tokens=3, ignore_eos=True))) for _ in range(5)))\n"
        "    print([r.result.completion_tokens for r in rs])\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[3, 3, 3, 3, 3]"
