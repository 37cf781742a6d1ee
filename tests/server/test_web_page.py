"""The web page in a real browser: headless Chromium (the system's, driven by Playwright)
against ``zigllama-batch serve`` on the tiny model. The charts fill from ``/metrics``, a chat message (sent by the page's ``?chat=``
parameter) streams back text piece by piece, and the page logs no error. A screenshot is kept:
in ``$ZIGLLAMA_BATCH_ARTIFACTS`` when set, else in the test's temporary directory; its path is
printed (``pytest -s``) and recorded as the test's ``screenshot`` property (JUnit XML)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from zigllama_batch.testing import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (Debian: apt-get install chromium; CI installs it)",
)

CHARTS = ("queue", "running", "batch", "tokens", "ttft", "hits")

# What the page shows, read from its DOM once the chat is done and a poll has seen it end.
PAGE_STATE = """() => {
  const chat = document.getElementById("chat").dataset.state;
  const reply = document.querySelector(".message.assistant");
  const charts = Object.fromEntries([...document.querySelectorAll(".card")].map((card) => [
    card.id.replace("chart-", ""),
    { points: +card.dataset.points, seen: +card.dataset.seen, peak: +card.dataset.peak },
  ]));
  const ready = (chat === "done" || chat === "error") && charts.tokens.peak > 0
    && Object.values(charts).every((c) => c.points >= 3);
  return ready && {
    chat,
    model: document.getElementById("model-name").textContent,
    reply: reply ? reply.textContent : null,
    deltas: reply ? +reply.dataset.deltas : 0,
    errors: [...document.querySelectorAll(".message.error")].map((e) => e.textContent),
    stats: document.getElementById("chat-stats").textContent,
    charts,
  };
}"""


def test_the_page_charts_the_processor_and_streams_a_chat(
    tiny_path: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """Opened with ``?chat=``, the page names the model, streams a reply in several pieces,
    and its six charts get a point a second, with the chat's steps, tokens, first-token time
    and prefix lookup in them."""
    assert CHROMIUM is not None
    artifacts = Path(os.environ.get("ZIGLLAMA_BATCH_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with (
        ServerProcess("--model", str(tiny_path), "--max-context", "256") as server,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            # Tests and CI run as root, where Chromium's sandbox cannot start; containers have
            # a small /dev/shm.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
            page.on(
                "console",
                lambda message: (
                    problems.append(f"console: {message.text}") if message.type == "error" else None
                ),
            )
            page.on(
                "requestfailed",
                lambda request: problems.append(f"failed: {request.url} {request.failure}"),
            )
            page.goto(f"{server.base_url}/?chat=Hello%20there&max_tokens=24&temperature=0")
            try:
                state: dict[str, Any] = page.wait_for_function(
                    PAGE_STATE, timeout=20_000
                ).json_value()
            finally:
                shot = artifacts / "web_page.png"
                page.screenshot(path=shot)
                record_property("screenshot", str(shot))
                print(f"\nscreenshot of the web page: {shot}")  # noqa: T201
            found = list(problems)  # before closing, which cuts the page's polls short
        finally:
            browser.close()

    assert state["model"] == "tiny"
    assert state["chat"] == "done", state["errors"]
    assert state["reply"], "the reply is empty"
    assert state["deltas"] >= 2, "the reply arrived in one piece, not streamed"
    assert "tokens" in state["stats"]
    charts = state["charts"]
    assert set(charts) == set(CHARTS)
    for name in ("queue", "running"):  # gauges: a value at every poll
        assert charts[name]["seen"] == charts[name]["points"], name
    for name in ("batch", "ttft", "hits"):  # means over requests and steps: the chat's
        assert charts[name]["seen"] >= 1, name
    assert charts["batch"]["peak"] >= 1
    assert charts["ttft"]["peak"] > 0
    assert found == []
