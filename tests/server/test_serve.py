"""`zigllama-batch serve` as a user starts it, on the tiny model: what it prints at start, and a
port already in use reported before the model loads."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from zigllama_batch.cli import main
from zigllama_batch.testing import ServerProcess


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def test_serve_says_what_it_serves_where_and_how(tiny_path: Path) -> None:
    """At start, stderr names the model file, the id clients pass, the address and every
    setting; the API key shows as on, never its value; --cors-origins answers a browser's
    preflight from those origins."""
    server = ServerProcess(
        "--model",
        str(tiny_path),
        "--strategy",
        "dynamic_timeout",
        "--max-batch-size",
        "3",
        "--max-queue-size",
        "7",
        "--activations",
        "int8",
        "--max-context",
        "128",
        "--drain-timeout",
        "4.5",
        "--cors-origins",
        "http://a.example, http://b.example",
        api_key="s3cret-key",
    )
    with server:
        assert server.model == "tiny"
        preflight = httpx.options(
            f"{server.base_url}/v1/chat/completions",
            headers={"Origin": "http://b.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "http://b.example"
    out = server.output
    assert f"serving tiny on {server.base_url} (Ctrl+C to stop)" in out
    for line in [
        f"model file      {tiny_path}",
        "model id        tiny  (clients pass it as `model`)",
        "activations     int8",
        "strategy        dynamic_timeout",
        "max batch size  3",
        "queue size      7",
        "context         128 tokens per sequence",
        "API key         on",
        "CORS origins    http://a.example, http://b.example",
        "drain timeout   4.5 s",
    ]:
        assert f"\n  {line}\n" in out, line
    assert "s3cret-key" not in out


def test_without_an_api_key_the_banner_says_it_is_off(tiny_path: Path) -> None:
    """Without --api-key (nor its environment variable) the start-up lines say there is no
    authentication."""
    with ServerProcess("--model", str(tiny_path)) as server:
        pass
    assert "API key         off (no authentication)" in server.output


@pytest.mark.parametrize("model", ["tiny", "/nonexistent/model.gguf"])
def test_a_port_in_use_is_reported_before_the_model_loads(
    model: str, taken_port: int, tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port another process listens on exits 1 with one line naming host:port, before the
    model is read (a missing model file is not even reported)."""
    path = str(tiny_path) if model == "tiny" else model
    assert main(["serve", "--port", str(taken_port), "--model", path]) == 1
    err = capsys.readouterr().err
    assert err == f"error: cannot listen on 127.0.0.1:{taken_port}: Address already in use\n"


def test_the_port_is_listened_on_before_the_model_loads() -> None:
    """The socket bound before the model loads already listens, so no other process can bind
    the same port meanwhile (SO_REUSEADDR lets it until then)."""
    from zigllama_batch.server.run import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="in use"):
                other.bind(("127.0.0.1", port))
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # accepted into the backlog while nothing serves yet
    finally:
        sock.close()


def test_serve_drafts_with_a_draft_model_when_asked(tiny_path: Path) -> None:
    """--speculative-tokens with --draft-model serves with both drafters, says so at start,
    and answers as without them (greedy text is the same)."""
    body = {"model": "tiny", "prompt": "one two three", "max_tokens": 12, "temperature": 0}
    with ServerProcess("--model", str(tiny_path)) as plain:
        want = httpx.post(f"{plain.base_url}/v1/completions", json=body).json()
    server = ServerProcess(
        "--model", str(tiny_path), "--speculative-tokens", "4", "--draft-model", str(tiny_path)
    )
    with server:
        got = httpx.post(f"{server.base_url}/v1/completions", json=body).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert (
        "speculation     up to 4 drafted tokens a sequence (prompt lookup, then the draft "
        f"model {tiny_path}), while at most 4 sequences decode" in server.output
    )


def test_a_draft_model_without_speculative_tokens_is_refused(
    tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--draft-model alone would never draft: exit 2 at once, before any model loads."""
    assert (
        main(["serve", "--port", "0", "--model", str(tiny_path), "--draft-model", str(tiny_path)])
        == 2
    )
    err = capsys.readouterr().err
    assert err == "error: --draft-model drafts only with --speculative-tokens K (K > 0)\n"
