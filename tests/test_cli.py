"""The zigllama-batch command line, run in-process on the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zigllama_batch.cli import main


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
    """An invalid sampling flag exits 2 with the field named, before any model loads."""
    assert main(["generate", "x", "--top-p", "7", "--model", "/nonexistent.gguf"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_missing_model_file_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """A model path that does not exist exits 1 with a one-line error."""
    assert main(["generate", "x", "--model", "/nonexistent.gguf"]) == 1
    assert "model file not found" in capsys.readouterr().err


def test_a_directory_as_model_is_reported_as_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--model DIR` exits 1 saying the path is a directory and a .gguf file is expected."""
    assert main(["generate", "x", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} is a directory" in err
    assert "GGUF model file (.gguf) is expected" in err


def test_demo_runs_concurrent_requests_and_prints_a_summary(
    tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`demo` pushes N requests through the processor and prints the summary table."""
    code = main(
        [
            "demo",
            "--requests",
            "6",
            "--max-batch-size",
            "4",
            "--strategy",
            "dynamic_timeout",
            "--model",
            str(tiny_path),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "throughput" in out
    assert "mean batch size" in out
    assert "6 requests, strategy dynamic_timeout" in err
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
