"""The web page at ``/``: a live view of the processor and a chat playground, as static files.

Inside: :func:`page_routes` (the page and its files, for the app to include) and
:data:`PAGE_PATHS` (their paths, which need no API key: the page holds no data of its own; it
asks the user for a key and sends it with its API calls). The page is a client like any other:
its charts read ``/metrics`` (so every figure has one definition, the Prometheus one), and its
playground reads ``/v1/models`` and streams from ``/v1/chat/completions``.

``static/`` holds the HTML, CSS and JavaScript, with no build step and nothing fetched from the
network (machines may be offline); uPlot draws the charts (MIT, vendored in ``static/vendor/``
with its license). Left out: history from before the page was opened (the page keeps what it
polls) and compression (the files total about 80 kB).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from importlib.resources.abc import Traversable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

__all__ = ["PAGE_PATHS", "page_routes"]

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # RFC 9239; not the system's mimetypes table
    ".svg": "image/svg+xml",
}
"""The files served, by suffix (a license or readme beside them ships but is not served)."""

_SECURITY_HEADERS = {
    # The page shows what a model wrote: nothing but the page's own files may run or load,
    # even if some text were ever inserted as markup.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _static_files(root: Traversable, prefix: str = "/static/") -> dict[str, Traversable]:
    """URL path -> file, for every servable file under ``root`` (``index.html`` at ``/``)."""
    found: dict[str, Traversable] = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            found |= _static_files(entry, f"{prefix}{entry.name}/")
        elif prefix == "/static/" and entry.name == "index.html":
            found["/"] = entry
        elif any(entry.name.endswith(suffix) for suffix in _MEDIA_TYPES):
            found[prefix + entry.name] = entry
    return found


_FILES = _static_files(resources.files(__package__) / "static")

PAGE_PATHS = frozenset(_FILES)
"""The page's paths (``/`` and ``/static/...``), relative to where the app is mounted."""


def page_routes() -> list[BaseRoute]:
    """A GET (and HEAD) route for the page and each of its files, read from the package now.

    Each answer carries an ETag, and ``Cache-Control: no-cache``: a browser asks again on every
    visit, so an upgraded server never runs with an old script, and gets 304 when unchanged.
    """
    return [_file_route(path, entry) for path, entry in _FILES.items()]


def _file_route(path: str, entry: Traversable) -> Route:
    body = entry.read_bytes()
    media_type = next(t for suffix, t in _MEDIA_TYPES.items() if entry.name.endswith(suffix))
    etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache", **_SECURITY_HEADERS}

    async def serve(request: Request) -> Response:
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    return Route(path, serve, methods=["GET"])
