"""The web page's files: served at ``/`` and ``/static/...`` with their content types, open
without the API key, not counted as API requests, and shipped in the wheel."""

from __future__ import annotations

import re
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fake_engine import FakeEngine

from zigllama_batch import BatchConfig, BatchProcessor, LLaMAModel, Tokenizer
from zigllama_batch.server import create_app
from zigllama_batch.server.web import PAGE_PATHS

Tiny = tuple[LLaMAModel, Tokenizer]
ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "zigllama_batch" / "server" / "static"


@pytest.fixture
async def client(tiny: Tiny) -> AsyncIterator[httpx.AsyncClient]:
    """The app with an API key, and a client that sends none."""
    processor = BatchProcessor.from_engine(
        FakeEngine(tiny[1], n_slots=2), BatchConfig(strategy="continuous", max_batch_size=2)
    )
    app = create_app(processor, model_name="tiny", api_key="sekret")
    async with (
        processor,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        yield client


def linked_files(html: str) -> set[str]:
    """The page's own files an HTML page links (``src`` and ``href`` under ``static/``)."""
    return {"/" + m for m in re.findall(r'(?:src|href)="(static/[^"]+)"', html)}


async def test_the_page_and_its_files_are_served_with_their_types(
    client: httpx.AsyncClient,
) -> None:
    """``/`` is HTML; each file it links is served, without an API key, with its media type."""
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>zigllama_batch</title>" in page.text
    linked = linked_files(page.text)
    assert {
        "/static/app.js",
        "/static/app.css",
        "/static/favicon.svg",
        "/static/vendor/uPlot.iife.min.js",
        "/static/vendor/uPlot.min.css",
    } <= linked
    expected = {
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
    }
    for path in sorted(linked):
        r = await client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"] == expected[Path(path).suffix], path
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == (STATIC / path.removeprefix("/static/")).read_bytes()
    assert (await client.get("/v1/models")).status_code == 401  # the API still needs the key


async def test_only_the_pages_files_are_open(client: httpx.AsyncClient) -> None:
    """The open paths are exactly ``/`` and the servable files under ``static/``: the license
    beside them and unknown paths are not served, and still ask for the key."""
    servable = {
        "/static/" + p.relative_to(STATIC).as_posix()
        for p in STATIC.rglob("*")
        if p.suffix in {".html", ".css", ".js", ".svg"}
    }
    assert (servable - {"/static/index.html"}) | {"/"} == PAGE_PATHS
    for path in ("/static/vendor/uPlot.LICENSE", "/static/missing.js", "/static/index.html"):
        assert (await client.get(path)).status_code == 401, path


async def test_an_unchanged_file_is_not_sent_again(client: httpx.AsyncClient) -> None:
    """Every answer has an ETag and asks the browser to revalidate; the same ETag back is 304."""
    first = await client.get("/static/app.js")
    assert first.headers["cache-control"] == "no-cache"
    again = await client.get("/static/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""


async def test_loading_the_page_counts_no_api_request(client: httpx.AsyncClient) -> None:
    """The page and its files are not API requests: ``zigllama_requests_total`` stays at 0."""
    for path in sorted(PAGE_PATHS):
        assert (await client.get(path)).status_code == 200
    metrics = (await client.get("/metrics")).text
    counts = re.findall(r'^zigllama_requests_total\{outcome="\w+"\} (\S+)$', metrics, re.M)
    assert counts
    assert {float(c) for c in counts} == {0.0}


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    """The built wheel holds every file under ``static/``, the vendored license included."""
    from hatchling.builders.wheel import WheelBuilder

    wheel = next(iter(WheelBuilder(str(ROOT)).build(directory=str(tmp_path))))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for path in STATIC.rglob("*"):
        if path.is_file():
            assert path.relative_to(ROOT).as_posix() in names, path
